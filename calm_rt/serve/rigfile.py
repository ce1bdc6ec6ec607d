"""A rig's serve settings in one TOML file: ``calm-rt serve --config rig.toml``.

Every ``calm-rt serve`` option has a key, grouped in tables along a frame's
way (docs/rig-config.md lists them; docs/rig.example.toml shows each one).
The effective value of an option is, in order of precedence: the flag given
on the command line, the file's key, the built-in default. Everything is
checked here, before anything binds or loads, and a bad value is refused
naming the flag or the file and key, and what is allowed.

Paths in the file are relative to the file's folder; paths on the command
line to the working directory. The effective configuration holds them
absolute, so that :func:`dump_toml`'s output means the same from anywhere.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calm_rt.errors import ConfigError
from calm_rt.live.triggers import TriggerRule, load_rules
from calm_rt.serve.priority import PRIORITIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULTS", "OPTIONS", "Option", "dump_toml", "effective_options", "load_rig_file"]


def _endpoint(value: str) -> str | None:
    """What is wrong with ZeroMQ endpoint ``value`` (None: nothing)."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        return "a ZeroMQ endpoint such as tcp://127.0.0.1:5555 (or ipc://PATH, inproc://NAME)"
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return "tcp://HOST:PORT with a port from 1 to 65535"
    return None


def _at_least(low: float, strict: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = math.isfinite(value) and (value > low if strict else value >= low)
        return None if ok else f"a number {'>' if strict else '>='} {low:g}"

    return check


def _device(value: str) -> str | None:
    index = value.removeprefix("cuda:")
    if value in ("auto", "cpu", "cuda") or (index != value and index.isdigit()):
        return None
    return "one of 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _cpus(value: list[int]) -> str | None:
    return None if all(c >= 0 for c in value) else "CPU numbers >= 0"


@dataclass(frozen=True)
class Option:
    """One serve option: its key in the file, its flag, its type and what values it may take."""

    table: str
    key: str
    dest: str  # the name in the effective configuration (the argparse dest)
    kind: str  # "str", "int", "float", "bool", "path" or "cpus" (a list of CPU numbers)
    default: Any
    flag: str | None  # None: only in the file
    doc: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # what is allowed, when ``value`` is not
    optional: bool = False  # may be unset (None: e.g. the shipped checkpoint)

    @property
    def where(self) -> str:
        return f"[{self.table}] {self.key}"


OPTIONS: tuple[Option, ...] = (
    Option("ingest", "address", "ingest", "str", "tcp://127.0.0.1:5555", "--ingest",
           "the scope's endpoint", check=_endpoint),
    Option("ingest", "mode", "ingest_mode", "str", "sub", "--ingest-mode",
           "sub: connect to the scope's PUB; pull: bind and let the scope PUSH",
           choices=("sub", "pull")),
    Option("ingest", "fps", "fps", "float", 30.0, "--fps", "the scope's frame rate in Hz",
           check=_at_least(0, strict=True)),
    Option("ingest", "kind", "kind", "str", "F", "--kind", "what traces hold: raw F or dF/F",
           choices=("F", "dff")),
    Option("ingest", "rois", "rois", "path", None, "--rois",
           "ROIs for raw frames: a suite2p folder or an npz; a folder of `plane0`, `plane1`, "
           "... for a multi-plane stream", optional=True),
    Option("ingest", "auto_segment", "auto_segment", "bool", True, None,
           "raw frames without ROIs: segment the first frames of the stream"),
    Option("ingest", "segment_frames", "segment_frames", "int", 300, None,
           "frames the automatic segmentation learns from", check=_at_least(10)),
    Option("ingest", "max_lag_ms", "max_lag_ms", "float", 500.0, "--max-lag-ms",
           "when a frame has waited this long, jump to the newest", check=_at_least(0, strict=True)),
    Option("ingest", "max_backlog", "max_backlog", "int", 60, None,
           "hard cap on waiting frames, oldest dropped first", check=_at_least(1)),
    Option("model", "checkpoint", "checkpoint", "path", None, "--checkpoint",
           "model checkpoint folder (unset: the shipped model)", optional=True),
    Option("model", "horizon", "horizon", "int", None, "--horizon",
           "frames to forecast (unset: the model's)", check=_at_least(1), optional=True),
    Option("model", "device", "device", "str", "auto", "--device",
           "where the model runs: auto, cpu, cuda or cuda:N", check=_device),
    Option("model", "threads", "threads", "int", None, "--threads",
           "torch threads (unset: all cores but one)", check=_at_least(1), optional=True),
    Option("model", "compile", "compile", "bool", False, "--compile",
           "torch.compile the engine step at start-up, before the first frame (CPU only)"),
    Option("model", "dtype", "dtype", "str", "float32", "--dtype",
           "the transformer's precision; bfloat16 and float16 on a GPU only",
           choices=("float32", "bfloat16", "float16")),
    Option("output", "publish", "publish", "str", "tcp://127.0.0.1:5556", "--publish",
           "where rigs subscribe (bound)", check=_endpoint),
    Option("output", "control", "control", "str", "tcp://127.0.0.1:5557", "--control",
           "JSON control socket (bound)", check=_endpoint),
    Option("output", "record", "record", "path", None, "--record",
           "record inputs and outputs to this HDF5 file (unset: no recording)", optional=True),
    Option("output", "status_every_s", "status_every_s", "float", 1.0, None,
           "seconds between status messages on the publish socket",
           check=_at_least(0, strict=True)),
    Option("output", "triggers_file", "triggers", "path", None, "--triggers",
           "JSON file of closed-loop trigger rules (or [[triggers]] tables here)", optional=True),
    Option("access", "keys", "keys", "path", None, "--keys",
           "CURVE key folder from `calm-rt keys` (needed beyond loopback)", optional=True),
    Option("access", "data_dir", "data_dir", "path", None, "--data-dir",
           "files a peer names over the control socket must lie here (unset: working dir)",
           optional=True),
    Option("cpu", "priority", "priority", "str", "normal", "--priority",
           "scheduling: normal, high (nice -10) or realtime (SCHED_FIFO)", choices=PRIORITIES),
    Option("cpu", "cpus", "cpus", "cpus", [], "--cpus",
           "pin the service threads to these CPUs ([]: any)", check=_cpus),
    Option("run", "seconds", "seconds", "float", None, "--seconds",
           "stop after this long (unset: until stopped)", check=_at_least(0, strict=True),
           optional=True),
)  # fmt: skip

TABLES = tuple(dict.fromkeys(o.table for o in OPTIONS))
_BY_DEST = {o.dest: o for o in OPTIONS}
# The effective configuration: every option's dest, the trigger file (--triggers) resolved
# into "rules" (trigger rules as dicts).
DEFAULTS: dict[str, Any] = {
    **{o.dest: o.default for o in OPTIONS if o.dest != "triggers"},
    "rules": [],
}


def _typed(option: Option, value: Any, where: str) -> Any:
    """``value`` as ``option``'s type, or :class:`ConfigError` naming ``where`` and what is allowed."""
    kind, given = option.kind, value

    def refuse(allowed: str) -> ConfigError:
        return ConfigError(f"{where} must be {allowed}, got {given!r}")

    if value is None and option.optional:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse("true or false")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse("a number")
        value = float(value)
    elif kind in ("str", "path"):
        if not isinstance(value, (str, Path)) or not str(value):
            raise refuse("a non-empty string" + (" (a path)" if kind == "path" else ""))
        value = Path(value) if kind == "path" else value
    elif kind == "cpus":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in value
        ):
            raise refuse("a list of CPU numbers, e.g. [2, 3]")
        value = [int(c) for c in value]
    if option.choices and value not in option.choices:
        raise refuse("one of " + ", ".join(repr(c) for c in option.choices))
    if option.check is not None and (allowed := option.check(value)) is not None:
        raise refuse(allowed)
    return value


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _elsewhere(key: str) -> str:
    """A hint naming the table where ``key`` (or a key close to it) belongs ("" if none)."""
    where = [o.where for o in OPTIONS if o.key == key] or [
        o.where for o in OPTIONS if difflib.get_close_matches(key, [o.key], cutoff=0.75)
    ]
    return f"; did you mean {where[0]!r}?" if where else ""


def _unknown_key(path: Path, table: str, key: str) -> ConfigError:
    here = [o.key for o in OPTIONS if o.table == table]
    hint = _suggest(key, here) or _elsewhere(key)  # or the right key in the wrong table?
    return ConfigError(
        f"{path}: unknown key {key!r} in [{table}]{hint} (valid keys in [{table}]: "
        f"{', '.join(here)}; see docs/rig-config.md)"
    )


def load_rig_file(path: str | Path) -> dict[str, Any]:
    """The options ``path`` sets, by dest, checked; relative paths taken from the file's folder.

    Trigger rules (``[[triggers]]`` tables or ``[output] triggers_file``) come back
    checked as ``"rules"``, a list of rule dicts. Raises :class:`ConfigError`
    naming the file and key for anything unknown, mistyped or impossible.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read rig configuration {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for table, body in data.items():
        if table == "triggers":
            continue
        if table not in TABLES and not isinstance(body, dict):
            hint = _elsewhere(table)
            raise ConfigError(
                f"{path}: key {table!r} is outside any table{hint} (every key belongs in "
                f"one of {', '.join(f'[{t}]' for t in TABLES)}; see docs/rig-config.md)"
            )
        if table not in TABLES:
            hint = _suggest(table, [*TABLES, "triggers"])
            top = [o.where for o in OPTIONS if o.key == table]
            if not hint and top:
                hint = f"; keys go in tables, did you mean {top[0]!r}?"
            raise ConfigError(
                f"{path}: unknown table [{table}]{hint} (tables: {', '.join(TABLES)}, "
                "[[triggers]]; see docs/rig-config.md)"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {table!r} must be a table ([{table}]), got {body!r}")
        for key, value in body.items():
            option = next((o for o in OPTIONS if o.table == table and o.key == key), None)
            if option is None:
                raise _unknown_key(path, table, key)
            typed = _typed(option, value, f"{path}: {option.where}")
            if option.kind == "path":
                typed = path.parent.absolute() / typed
            values[option.dest] = typed
    inline = data.get("triggers")
    if inline is not None and "triggers" in values:
        raise ConfigError(
            f"{path}: give trigger rules either as [[triggers]] tables or as "
            "[output] triggers_file, not both"
        )
    if inline is not None:
        if not isinstance(inline, list):
            raise ConfigError(f"{path}: triggers must be [[triggers]] tables, got {inline!r}")
        values["rules"] = [_rule(path, i, rule) for i, rule in enumerate(inline)]
        names = [r["name"] for r in values["rules"]]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            # the server keeps one rule per name: a second would silently replace the first
            raise ConfigError(f"{path}: [[triggers]] names must be unique; given twice: {twice}")
    elif "triggers" in values:
        values["rules"] = [r.to_dict() for r in load_rules(values.pop("triggers"))]
    return values


def _rule(path: Path, index: int, data: Any) -> dict[str, Any]:
    try:
        return TriggerRule.from_dict(data).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{path}: [[triggers]] number {index + 1}: {exc}") from exc


def effective_options(file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then the file's values, then explicit ``flags`` (by dest); every value checked.

    ``flags`` holds only the flags given on the command line. A ``--triggers``
    file there replaces the file's rules. Relative flag paths become absolute.
    """
    merged = {**DEFAULTS, **file_values}
    for dest, value in flags.items():
        option = _BY_DEST[dest]
        typed = _typed(option, value, option.flag or option.where)
        if option.kind == "path" and typed is not None:
            typed = typed.absolute()
        if dest == "triggers":
            merged["rules"] = [r.to_dict() for r in load_rules(typed)]
        else:
            merged[dest] = typed
    return merged


def dump_toml(config: Mapping[str, Any]) -> str:
    """The effective configuration as a rig file that :func:`load_rig_file` reads back the same.

    Unset options are written as comments; trigger rules as ``[[triggers]]`` tables.
    """
    lines = ["# calm-rt serve configuration (calm-rt serve --print-config)"]
    for table in TABLES:
        lines += ["", f"[{table}]"]
        for o in (o for o in OPTIONS if o.table == table and o.dest != "triggers"):
            value = config[o.dest]
            comment = f"  # {o.flag}: {o.doc}" if o.flag else f"  # {o.doc}"
            if value is None:
                lines.append(f"# {o.key} = (unset){comment}")
            else:
                lines.append(f"{o.key} = {_toml_value(value)}{comment}")
    for rule in config["rules"]:
        lines += ["", "[[triggers]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """One TOML value for the flat types a rig file holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # control characters must be escaped in TOML
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
