"""The service threads' scheduling priority and CPU affinity (serve.priority)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from calm_rt.errors import ConfigError
from calm_rt.model import PRESETS, CalM
from calm_rt.serve import Server, ServiceConfig
from calm_rt.serve.priority import claim_cpu


def _free() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _may_raise_priority() -> bool:
    try:
        claim_cpu("realtime")()
    except ConfigError:
        return False
    return True


def test_impossible_settings_are_refused_before_anything_binds():
    with pytest.raises(ConfigError, match="priority must be one of"):
        ServiceConfig(priority="urgent")
    with pytest.raises(ConfigError, match="not available to this process"):
        ServiceConfig(cpus=(os.cpu_count() + 7,))


@pytest.mark.skipif(not _may_raise_priority(), reason="this process may not raise its priority")
def test_service_threads_run_realtime_and_pinned_and_the_caller_gets_its_own_back():
    torch.manual_seed(0)
    cpu = min(os.sched_getaffinity(0))
    cfg = ServiceConfig(ingest=_free(), publish=_free(), control=_free(), ingest_mode="pull",
                        priority="realtime", cpus=(cpu,))  # fmt: skip
    before = (os.sched_getscheduler(0), os.sched_getaffinity(0))
    server = Server(cfg, model=CalM(PRESETS["tiny"]).eval()).start()
    try:
        threads = [t for t in threading.enumerate() if t.name.startswith("calm-rt-")]
        assert {t.name for t in threads} >= {"calm-rt-compute", "calm-rt-ingest", "calm-rt-publish"}
        for t in threads:
            assert os.sched_getscheduler(t.native_id) == os.SCHED_FIFO, t.name
            assert os.sched_getaffinity(t.native_id) == {cpu}, t.name
        assert (os.sched_getscheduler(0), os.sched_getaffinity(0)) == before
        assert server.status()["priority"] == "realtime"
    finally:
        server.stop()


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to drop it")
def test_an_unprivileged_server_refuses_realtime_and_says_how_to_grant_it():
    # A child that gave up root (as a lab user's process is) asks for realtime; it
    # imports first, since nobody may not read the checkout.
    code = (
        "import os\n"
        "from calm_rt.errors import ConfigError\n"
        "from calm_rt.serve.priority import claim_cpu\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    claim_cpu('realtime')\nexcept ConfigError as e:\n    print(e); raise SystemExit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "not permitted" in out.stdout and "cap_sys_nice" in out.stdout
