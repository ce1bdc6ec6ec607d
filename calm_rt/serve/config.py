"""What a server listens on and runs: :class:`ServiceConfig`, and where peers may name files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calm_rt.errors import ConfigError
from calm_rt.live.device import resolve_device
from calm_rt.live.engine_config import DTYPES
from calm_rt.serve.priority import PRIORITIES, check_cpus
from calm_rt.wire.security import CurveKeys, check_bind_policy

__all__ = ["ServiceConfig", "default_torch_threads"]


@dataclass(frozen=True)
class ServiceConfig:
    """Where to listen and what to run. Addresses are ZeroMQ endpoints."""

    ingest: str = "tcp://127.0.0.1:5555"
    ingest_mode: str = "sub"  # "sub": connect to the scope's PUB; "pull": bind PULL
    publish: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    checkpoint: Path | None = None
    fps: float = 30.0
    kind: str = "F"
    horizon: int | None = None
    rois: Path | None = None  # footprints for raw frames (load_volume_rois: one plane or K)
    auto_segment: bool = True  # raw frames without ROIs: segment the first seconds of the stream
    segment_frames: int = 300  # frames the automatic segmentation learns from (10 s at 30 Hz)
    # When the oldest waiting frame has waited longer than this, compute is behind:
    # every waiting frame but the newest is dropped (counted), so latency stays
    # bounded - a stale forecast is no use to a closed loop. Shorter stalls (a
    # shared machine has some of 100-300 ms) are absorbed without losing a frame.
    max_lag_ms: float = 500.0
    max_backlog: int = 60  # hard cap on waiting frames (memory), oldest dropped first
    record: Path | None = None
    triggers: tuple[dict[str, Any], ...] = ()
    keys: CurveKeys | None = None
    status_every_s: float = 1.0
    # torch intra-op threads for the compute thread; None: all cores but one. The
    # spare core is for ingest/publish and for the scope and rig software beside
    # us: when they preempt one of torch's threads every op waits for it (on 2
    # cores, 2 threads gave a p99 4 ms worse than 1).
    torch_threads: int | None = None
    # Files a peer names over the control socket (recordings, checkpoints, ROI
    # and trigger files) must lie inside this folder; None: the working directory.
    # What the person starting the server gives on the command line is not limited.
    data_dir: Path | None = None
    # Where the model runs: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N.
    # Resolved here, so `cuda` on a machine without a GPU fails before anything loads.
    device: str = "auto"
    # The service threads' claim on the CPU (serve.priority): "normal", "high" (nice -10)
    # or "realtime" (SCHED_FIFO); both of the latter need the right to raise priority.
    priority: str = "normal"
    cpus: tuple[int, ...] = ()  # CPU affinity of the service threads; (): any core
    # torch.compile the engine step in the start-up warm-up (EngineConfig.compile; CPU only).
    compile: bool = False
    # The transformer's precision (EngineConfig.dtype): float32, or bfloat16 / float16 on a
    # GPU (tensor cores; forecasts within a tested bound of float32's, tokens exact).
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and self.device == "cpu":
            raise ConfigError(
                f"--dtype {self.dtype} is for a GPU's tensor cores; on the CPU half precision is "
                "slower than float32 and no more exact: use --dtype float32 (or --device cuda)"
            )
        if self.compile and self.device != "cpu":
            raise ConfigError(
                f"compile is for the CPU, but the model runs on {self.device}: drop --compile "
                "(the Triton kernels run the step on a GPU) or pass --device cpu"
            )
        if self.ingest_mode not in ("sub", "pull"):
            raise ConfigError(f"ingest_mode must be 'sub' or 'pull', got {self.ingest_mode!r}")
        if not (self.fps > 0):
            raise ConfigError(f"fps must be a positive frame rate, got {self.fps}")
        if self.kind not in ("F", "dff"):
            raise ConfigError(f"kind must be 'F' or 'dff', got {self.kind!r}")
        if self.segment_frames < 10:
            raise ConfigError(f"segment_frames must be >= 10, got {self.segment_frames}")
        if self.max_backlog < 1:
            raise ConfigError("max_backlog must be >= 1")
        if not self.max_lag_ms > 0:
            raise ConfigError(f"max_lag_ms must be > 0, got {self.max_lag_ms}")
        if not self.status_every_s > 0:
            raise ConfigError(f"status_every_s must be > 0, got {self.status_every_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir {self.data_dir} is not a folder")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        object.__setattr__(self, "cpus", tuple(int(c) for c in self.cpus))
        check_cpus(self.cpus)
        check_bind_policy(self, self.keys)

    @property
    def peer_files_root(self) -> Path:
        """The folder control-socket paths are resolved in (absolute)."""
        return Path(self.data_dir if self.data_dir is not None else os.getcwd()).resolve()


def default_torch_threads() -> int:
    """All the cores this process may use but one (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)
