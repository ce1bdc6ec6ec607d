"""`calm-rt serve --config rig.toml`: a rig's settings in one file, checked before anything binds."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from calm_rt.cli import build_parser
from calm_rt.cli.live import SERVE_OPTION_DESTS
from calm_rt.errors import ConfigError
from calm_rt.serve.client import control_request
from calm_rt.serve.rigfile import (
    DEFAULTS,
    OPTIONS,
    _toml_string,
    dump_toml,
    effective_options,
    load_rig_file,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "rig.example.toml"


def serve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calm_rt", "serve", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def rig_file(tmp_path: Path, text: str, name: str = "rig.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_serve_flag_has_a_key_in_the_file():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    dests = {a.dest for a in sub.choices["serve"]._actions}
    per_invocation = {"help", "config", "print_config", "exit_with"}
    assert dests - per_invocation == set(SERVE_OPTION_DESTS)
    assert {o.dest for o in OPTIONS if o.flag} == set(SERVE_OPTION_DESTS)


def test_typo_is_refused_naming_the_key_and_the_right_one(tmp_path):
    path = rig_file(tmp_path, "[ingest]\nfsp = 30.0\n")
    proc = serve("--config", str(path), "--print-config")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "unknown key 'fsp' in [ingest]; did you mean 'fps'?" in proc.stderr


@pytest.mark.parametrize(
    "text, says",
    [
        ("[ingest]\nfps = 30.0\n[cpuu]\npriority = 'high'\n", "unknown table [cpuu]; did you mean 'cpu'?"),
        ("[model]\nfps = 30.0\n", "did you mean '[ingest] fps'?"),
        ("fps = 30.0\n", "key 'fps' is outside any table; did you mean '[ingest] fps'?"),
        ("[[triggers]]\nname = 'A'\nneurons = [1]\nwindow = 3\n", "unknown trigger field(s) ['window']"),
    ],
)  # fmt: skip
def test_misplaced_keys_are_refused_with_where_they_belong(tmp_path, text, says):
    with pytest.raises(ConfigError) as err:
        load_rig_file(rig_file(tmp_path, text))
    assert says in str(err.value)


@pytest.mark.parametrize(
    "text, says",
    [
        ('[ingest]\nfps = "fast"\n', "[ingest] fps must be a number, got 'fast'"),
        ("[ingest]\nsegment_frames = 300.5\n", "[ingest] segment_frames must be an integer"),
        ("[ingest]\nauto_segment = 1\n", "[ingest] auto_segment must be true or false, got 1"),
        ("[output]\npublish = 5556\n", "[output] publish must be a non-empty string, got 5556"),
        ("[cpu]\ncpus = '2,3'\n", "[cpu] cpus must be a list of CPU numbers"),
        ("[cpu]\ncpus = [true]\n", "[cpu] cpus must be a list of CPU numbers"),
        ("[model]\nhorizon = 16.0\n", "[model] horizon must be an integer, got 16.0"),
        ("[ingest]\nrois = []\n", "[ingest] rois must be a non-empty string (a path)"),
        ("model = 3\n", "'model' must be a table ([model]), got 3"),
    ],
)
def test_wrong_type_is_refused_naming_the_key(tmp_path, text, says):
    with pytest.raises(ConfigError) as err:
        load_rig_file(rig_file(tmp_path, text))
    assert says in str(err.value)


@pytest.mark.parametrize(
    "text, says",
    [
        ("[ingest]\nfps = -30.0\n", "[ingest] fps must be a number > 0, got -30.0"),
        ("[ingest]\nfps = nan\n", "[ingest] fps must be a number > 0"),
        ("[ingest]\nmode = 'push'\n", "[ingest] mode must be one of 'sub', 'pull', got 'push'"),
        ("[ingest]\nkind = 'dF/F'\n", "[ingest] kind must be one of 'F', 'dff'"),
        ("[ingest]\nsegment_frames = 5\n", "[ingest] segment_frames must be a number >= 10, got 5"),
        ("[ingest]\naddress = 'tcp://127.0.0.1:70000'\n", "a port from 1 to 65535"),
        ("[output]\ncontrol = 'tcp://127.0.0.1:0'\n", "a port from 1 to 65535"),
        ("[output]\npublish = '127.0.0.1:5556'\n", "[output] publish must be a ZeroMQ endpoint"),
        ("[cpu]\npriority = 'max'\n", "[cpu] priority must be one of 'normal', 'high', 'realtime'"),
        ("[cpu]\ncpus = [-1]\n", "[cpu] cpus must be CPU numbers >= 0"),
        ("[model]\ndevice = 'tpu'\n", "[model] device must be one of 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("[model]\nthreads = 0\n", "[model] threads must be a number >= 1"),
        ("[run]\nseconds = 0\n", "[run] seconds must be a number > 0"),
        ("[[triggers]]\nname = 'A'\nneurons = [1]\nwindow_ms = -5.0\n", "[[triggers]] number 1: window_ms must be > 0"),
    ],
)  # fmt: skip
def test_impossible_value_is_refused_naming_the_key_and_what_is_allowed(tmp_path, text, says):
    with pytest.raises(ConfigError) as err:
        load_rig_file(rig_file(tmp_path, text))
    assert says in str(err.value)


def test_impossible_value_exits_non_zero_before_binding(tmp_path):
    """A refused file binds nothing: the control port stays free for another server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = rig_file(
        tmp_path, f"[output]\ncontrol = 'tcp://127.0.0.1:{port}'\n[cpu]\npriority = 'max'\n"
    )
    proc = serve("--config", str(path))
    assert proc.returncode == 1
    assert "calm-rt serve: error:" in proc.stderr and "[cpu] priority" in proc.stderr
    assert "serving:" not in proc.stdout


def test_flag_given_overrides_the_file_and_the_file_overrides_defaults(tmp_path):
    path = rig_file(tmp_path, "[ingest]\nfps = 15.0\nkind = 'dff'\n[cpu]\ncpus = [0]\n")
    proc = serve("--config", str(path), "--fps", "30", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = tomllib.loads(proc.stdout)
    assert printed["ingest"]["fps"] == 30.0  # the flag, though equal to the built-in default
    assert printed["ingest"]["kind"] == "dff"  # the file
    assert printed["cpu"]["cpus"] == [0]
    assert printed["ingest"]["mode"] == "sub"  # neither: the default
    bad_flag = serve("--config", str(path), "--fps", "-1", "--print-config")
    assert bad_flag.returncode == 1 and "--fps must be a number > 0, got -1.0" in bad_flag.stderr


def test_trigger_flag_replaces_the_file_rules(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"name": "B", "neurons": [4, 5]}]))
    path = rig_file(tmp_path, "[[triggers]]\nname = 'A'\nneurons = [1]\n")
    assert [r["name"] for r in effective_options(load_rig_file(path), {})["rules"]] == ["A"]
    effective = effective_options(load_rig_file(path), {"triggers": rules})
    assert [r["name"] for r in effective["rules"]] == ["B"]


def test_two_inline_rules_of_one_name_are_refused(tmp_path):
    rule = "[[triggers]]\nname = 'A'\nneurons = [1]\n"
    with pytest.raises(ConfigError, match=r"given twice: \['A'\]"):
        load_rig_file(rig_file(tmp_path, rule + rule))


def test_triggers_file_and_inline_rules_together_are_refused(tmp_path):
    (tmp_path / "rules.json").write_text("[]")
    path = rig_file(
        tmp_path,
        "[output]\ntriggers_file = 'rules.json'\n[[triggers]]\nname = 'A'\nneurons = [1]\n",
    )
    with pytest.raises(ConfigError, match="not both"):
        load_rig_file(path)


def test_paths_in_the_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "rig").mkdir()
    (tmp_path / "rig" / "rules.json").write_text(json.dumps({"rules": [{"name": "C", "neurons": [0]}]}))  # fmt: skip
    path = rig_file(tmp_path / "rig", "[ingest]\nrois = 'rois.npz'\n[output]\ntriggers_file = 'rules.json'\n")  # fmt: skip
    values = load_rig_file(path)
    assert values["rois"] == (tmp_path / "rig" / "rois.npz").absolute()
    assert [r["name"] for r in values["rules"]] == ["C"]


def test_print_config_loads_back_to_the_same_configuration(tmp_path):
    (tmp_path / "data").mkdir()
    path = rig_file(
        tmp_path,
        '[ingest]\nmode = "pull"\nfps = 12.5\nrois = "r\\u00e9g ions.npz"\nsegment_frames = 90\n'
        '[model]\nhorizon = 8\ndevice = "cpu"\nthreads = 2\n'
        '[output]\nrecord = "out/s.h5"\nstatus_every_s = 0.25\n'
        '[access]\ndata_dir = "data"\n[cpu]\ncpus = [0]\n[run]\nseconds = 1e-3\n'
        '[[triggers]]\nname = "A \\"quoted\\""\nneurons = [1, 2]\nthreshold = -1.5\ndirection = "below"\n'
        '[[triggers]]\nname = "B"\nneurons = [3]\n',
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = serve("--config", str(path), "--kind", "dff", "--print-config", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    printed = rig_file(elsewhere, first.stdout, "printed.toml")
    expected = effective_options(load_rig_file(path), {"kind": "dff"})
    assert effective_options(load_rig_file(printed), {}) == expected
    assert expected != DEFAULTS and len(expected["rules"]) == 2
    again = serve("--config", str(printed), "--print-config", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout


def test_print_config_without_a_file_is_the_defaults():
    assert effective_options({}, {}) == DEFAULTS
    proc = serve("--print-config")
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["ingest"]["address"] == "tcp://127.0.0.1:5555"


@given(st.text())
def test_toml_strings_load_back_unchanged(text):
    assert tomllib.loads(f"s = {_toml_string(text)}")["s"] == text


def test_dump_toml_writes_every_key():
    text = dump_toml(DEFAULTS)
    for o in OPTIONS:
        if o.dest != "triggers":  # resolved into [[triggers]] tables
            assert f"\n{o.key} = " in text or f"\n# {o.key} = " in text, o.where


def test_example_shows_every_key_with_its_default():
    text = EXAMPLE.read_text()
    for o in OPTIONS:
        assert f"\n{o.key} = " in text or f"\n# {o.key} = " in text, (
            f"{o.where} is not in the example"
        )
    example = effective_options(load_rig_file(EXAMPLE), {})
    assert {k: v for k, v in example.items() if k != "rules"} == {
        k: v for k, v in DEFAULTS.items() if k != "rules"
    }
    assert [r["name"] for r in example["rules"]] == ["assembly-A"]


def _free() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _status(ctl_ep: str) -> dict | None:
    try:
        return control_request(ctl_ep, {"cmd": "status"}, timeout_s=0.5)
    except TimeoutError:
        return None


@pytest.mark.slow
def test_serve_with_the_example_file_answers_status_and_stops_cleanly(tmp_path):
    ctl_ep = _free()
    proc = subprocess.Popen(
        [sys.executable, "-m", "calm_rt", "serve", "--config", str(EXAMPLE),
         "--ingest", _free(), "--publish", _free(), "--control", ctl_ep],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        status = None
        while status is None:  # until it answers, or it exits
            if proc.poll() is not None:
                pytest.fail(f"serve exited {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
            status = _status(ctl_ep)
            time.sleep(0.05)
        assert status["priority"] == "normal" and status["answered"] == 0
        rules = control_request(ctl_ep, {"cmd": "list_triggers"})["rules"]
        assert [r["name"] for r in rules] == ["assembly-A"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["stopped"].startswith("signal")
