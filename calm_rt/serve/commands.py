"""Control commands: one typed handler per command, its request validated before it runs.

A request is a JSON object ``{"cmd": NAME, ...fields}``. Each command
declares its fields (type, range, required or default); :func:`run_command`
checks the whole request against them, then calls the handler, which may
rely on what was checked. Every failure is answered
``{"ok": false, "error": "<what to do>"}`` and never ends a service thread.

Files a peer names (recordings, checkpoints, ROI and trigger files) are
resolved inside the server's data folder (``--data-dir``, default the
working directory); anything outside it, missing, or not writable is refused
at request time with the reason. See docs/protocol.md for the command list.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from calm_rt.errors import CalmError, ConfigError
from calm_rt.extract import Footprints, VolumeRois
from calm_rt.live import TriggerRule, TriggerSet, load_rules
from calm_rt.model import CalM, load_checkpoint
from calm_rt.serve.config import ServiceConfig
from calm_rt.serve.session import LiveSession

__all__ = [
    "COMMANDS",
    "Arg",
    "Command",
    "CommandTarget",
    "probe_new_file",
    "resolve_peer_path",
    "run_command",
]

log = logging.getLogger("calm_rt.serve")


class CommandTarget(Protocol):
    """What commands act on (the compute thread's :class:`~calm_rt.serve.compute.Compute`)."""

    config: ServiceConfig
    session: LiveSession | None
    triggers: TriggerSet
    status: Callable[[], dict[str, Any]]

    @property
    def recording(self) -> Path | None: ...

    def replace_setup(
        self,
        model: CalM | None = None,
        meta: dict[str, Any] | None = None,
        rois: Footprints | VolumeRois | None = None,
        rois_source: str | None = None,
    ) -> None: ...

    def start_recording(self, path: Path) -> None: ...

    def stop_recording(self) -> Path | None: ...


Handler = Callable[[CommandTarget, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Arg:
    """One field of a request.

    ``kind``: ``str``, ``number`` (finite float in ``[low, high]``),
    ``names`` (a non-empty list of distinct non-empty strings), ``rule`` (a
    JSON object), or a path: ``existing`` (a file or folder that exists),
    ``new_file`` (a file to create: its folder exists and is writable, the
    file does not). Paths are resolved in the data folder.
    """

    name: str
    kind: str
    required: bool = False
    default: Any = None
    low: float = -math.inf
    high: float = math.inf


@dataclass(frozen=True)
class Command:
    handler: Handler
    args: tuple[Arg, ...]
    doc: str


MAX_NAME = 200  # characters in a name a peer gives (a rule, a behaviour variable)
MAX_NAMES = 256  # behaviour variables one calibration may name


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a peer's value may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_peer_path(root: Path, value: Any, kind: str, field: str) -> Path:
    """``value`` as a path inside ``root``, checked for ``kind`` (``existing`` or ``new_file``)."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 4096:
        raise ConfigError(f"{field!r} must be a non-empty path string, got {_short(value)}")
    try:
        return _check_path(root, value, kind, field)
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission
        raise ConfigError(f"{field!r}: cannot use {_short(value)} as a path ({exc})") from exc


def _check_path(root: Path, value: str, kind: str, field: str) -> Path:
    path = Path(value)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"{field!r}: {_short(value)} is outside the server's data folder {root}; name a file "
            "inside it (the server's --data-dir)"
        )
    if kind == "existing":
        if not path.exists():
            raise ConfigError(f"{field!r}: {path} does not exist")
        return path
    if path.exists():
        raise ConfigError(
            f"{field!r}: {path} exists; recordings are never overwritten, choose a new name"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{field!r}: the folder {parent} does not exist; create it first")
    probe_new_file(path, field)
    return path


def probe_new_file(path: Path, field: str = "path") -> None:
    """Create ``path`` and remove it again: whether the server can write it, asked now.

    ``os.access`` misses a read-only mount, a full quota and other
    filesystems' rules; creating the file answers for all of them, at request
    time rather than at the first frame, when nobody is there to hear it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"{field!r}: the server cannot create {path} ({exc.strerror or exc}); "
            "choose a writable folder inside its data folder"
        ) from exc
    os.close(fd)
    os.unlink(path)


def _parse(name: str, command: Command, request: dict[str, Any], root: Path) -> dict[str, Any]:
    allowed = {a.name for a in command.args}
    unknown = sorted(set(request) - allowed - {"cmd"})
    if unknown:
        fields = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(f"{name}: unknown field(s) {unknown}; its fields: {fields}")
    out: dict[str, Any] = {}
    for arg in command.args:
        if arg.name not in request or request[arg.name] is None:
            if arg.required:
                raise ConfigError(f"{name} needs {arg.name!r} ({arg.kind})")
            out[arg.name] = arg.default
            continue
        value = request[arg.name]
        where = f"{name}: {arg.name!r}"
        if arg.kind == "str":
            if not isinstance(value, str) or not value or len(value) > MAX_NAME:
                raise ConfigError(
                    f"{where} must be a non-empty string of at most {MAX_NAME} characters, "
                    f"got {_short(value)}"
                )
        elif arg.kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {_short(value)}")
            # float() of a 400-digit JSON integer raises OverflowError: out of range anyway.
            number = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
            if not (math.isfinite(number) and arg.low <= number <= arg.high):
                raise ConfigError(
                    f"{where} must be in [{arg.low:g}, {arg.high:g}], got {_short(value)}"
                )
            value = number
        elif arg.kind == "names":
            if (
                not isinstance(value, list)
                or not 0 < len(value) <= MAX_NAMES
                or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME for v in value)
                or len(set(value)) != len(value)
            ):
                raise ConfigError(
                    f"{where} must be a list of 1 to {MAX_NAMES} distinct non-empty names "
                    f"(at most {MAX_NAME} characters each), got {_short(value)}"
                )
            value = tuple(value)
        elif arg.kind == "rule":
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a JSON object, got {type(value).__name__}")
        elif arg.kind in ("existing", "new_file"):
            value = resolve_peer_path(root, value, arg.kind, arg.name)
        else:  # pragma: no cover - a programming error in COMMANDS
            raise AssertionError(f"unknown argument kind {arg.kind}")
        out[arg.name] = value
    return out


def run_command(compute: CommandTarget, request: dict[str, Any]) -> dict[str, Any]:
    """Validate and run one request; always returns a reply, never raises."""
    name = request.get("cmd")
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        return {
            "ok": False,
            "error": f"unknown command {_short(name)}; commands: {', '.join(COMMANDS)}, shutdown",
        }
    try:
        args = _parse(name, command, request, compute.config.peer_files_root)
        return {"ok": True, **command.handler(compute, args)}
    except CalmError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug in a handler must not end the compute thread
        log.exception("control command %r failed", name)
        return {"ok": False, "error": f"internal error in {name}: {type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------
# The handlers (run on the compute thread, between frames)


def _status(c: CommandTarget, _: dict[str, Any]) -> dict[str, Any]:
    return c.status()


def _reset(c: CommandTarget, _: dict[str, Any]) -> dict[str, Any]:
    if c.session is not None:
        c.session.engine.reset()
    return {}


def _refuse_while_recording(c: CommandTarget, what: str) -> None:
    if c.recording is not None:
        raise ConfigError(
            f"{what} starts a new session, and a recording holds one session: send stop_recording first"
        )


def _load_checkpoint(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    _refuse_while_recording(c, "load_checkpoint")
    model, meta = load_checkpoint(args["path"])
    c.replace_setup(model=model, meta=meta)
    return {"checkpoint": str(args["path"] or "shipped default")}


def _set_rois(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    from calm_rt.extract import load_volume_rois

    _refuse_while_recording(c, "set_rois")
    rois = load_volume_rois(args["path"])  # one plane, or a folder of plane0, plane1, ...
    for rule in c.triggers.rules.values():  # the new session must fit every rule, or none changes
        c.triggers.check(rule, rois.n_rois)
    c.replace_setup(rois=rois, rois_source=str(args["path"]))
    return {"rois": rois.n_rois}


def _start_recording(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    path = args["path"]
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ConfigError(f"'path': a recording is HDF5; name it *.h5, got {path.name}")
    if c.recording is not None:
        raise ConfigError(f"already recording to {c.recording}; send stop_recording first")
    try:
        c.start_recording(path)
    except OSError as exc:  # the file could not be created after all (a race, a full disk)
        raise ConfigError(f"cannot record to {path}: {exc}") from exc
    return {"path": str(path)}


def _stop_recording(c: CommandTarget, _: dict[str, Any]) -> dict[str, Any]:
    path = c.stop_recording()
    return {"path": str(path) if path else None}


def _needs_neurons(c: CommandTarget) -> None:
    if c.triggers.n_neurons is None:
        raise ConfigError(
            "no session yet, so its neurons are unknown: send trigger rules once frames arrive "
            "(status shows 'neurons'), or give them at start with --triggers / --rois"
        )


def _add_trigger(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    rule = TriggerRule.from_dict(args["rule"])
    _needs_neurons(c)
    c.triggers.add(rule)
    return {"rule": rule.to_dict()}


def _add_triggers_file(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    rules = load_rules(args["path"])
    _needs_neurons(c)
    for rule in rules:  # all or none
        c.triggers.check(rule)
    for rule in rules:
        c.triggers.add(rule)
    return {"added": [r.name for r in rules]}


def _remove_trigger(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    c.triggers.remove(args["name"])
    return {}


def _list_triggers(c: CommandTarget, _: dict[str, Any]) -> dict[str, Any]:
    return {"rules": [r.to_dict() for r in c.triggers.rules.values()]}


def _calibrate(c: CommandTarget, args: dict[str, Any]) -> dict[str, Any]:
    if c.session is None:
        raise ConfigError(
            "no session yet: calibrate once frames are arriving (status shows 'neurons')"
        )
    cal = c.session.engine.start_calibration(args["seconds"], args["names"])
    return {"frames": cal.target_frames}


COMMANDS: dict[str, Command] = {
    "status": Command(_status, (), "counters, latency, session, calibration"),
    "reset": Command(_reset, (), "forget the session's history (same neurons)"),
    "load_checkpoint": Command(
        _load_checkpoint, (Arg("path", "existing"),), "switch model (default: the shipped one)"
    ),
    "set_rois": Command(_set_rois, (Arg("path", "existing", required=True),), "switch ROIs"),
    "start_recording": Command(
        _start_recording, (Arg("path", "new_file", required=True),), "record to a new HDF5 file"
    ),
    "stop_recording": Command(_stop_recording, (), "close the recording"),
    "add_trigger": Command(_add_trigger, (Arg("rule", "rule", required=True),), "add a rule"),
    "add_triggers_file": Command(
        _add_triggers_file, (Arg("path", "existing", required=True),), "add rules from JSON"
    ),
    "remove_trigger": Command(
        _remove_trigger, (Arg("name", "str", required=True),), "remove a rule"
    ),
    "list_triggers": Command(_list_triggers, (), "the active rules"),
    "calibrate": Command(
        _calibrate,
        (
            Arg("names", "names", default=()),
            Arg("seconds", "number", default=120.0, low=1.0, high=3600.0),
        ),
        "calibrate the forecasts on the next seconds of frames, and the behaviour readout "
        "on frames with behaviour when names are given",
    ),
}
