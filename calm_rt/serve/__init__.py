"""The service: threads and sockets around the live path, and the tools that talk to it.

    scope --ZMQ--> Ingest --Inbox--> Compute (LiveSession: extract -> engine step ->
    triggers -> recording) --Outbox--> Publisher --ZMQ--> rigs, napari
                     Control (JSON commands) --^

:class:`Server` starts the four threads (:mod:`.server`); :mod:`.commands`
holds the control commands; :mod:`.recording` the crash-safe HDF5
recording, :mod:`.nwb_export` the same as NWB; :mod:`.client` the rig side (:class:`RigClient`,
:func:`control_request`); :mod:`.mockscope` a microscope stand-in;
:mod:`.demo` the whole loop on loopback; :mod:`.rigfile` a rig's serve settings as
one TOML file (``calm-rt serve --config``).
"""

from calm_rt.serve.client import Endpoints, LatencyStats, RigClient, control_request
from calm_rt.serve.config import ServiceConfig, default_torch_threads
from calm_rt.serve.recording import Recorder, read_recording
from calm_rt.serve.server import EXIT_CRASH, Server

__all__ = [
    "EXIT_CRASH",
    "Endpoints",
    "LatencyStats",
    "Recorder",
    "RigClient",
    "Server",
    "ServiceConfig",
    "control_request",
    "default_torch_threads",
    "read_recording",
]
