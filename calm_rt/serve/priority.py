"""The service threads' claim on the CPU: scheduling priority and CPU affinity.

On the acquisition PC the scope software, a viewer or a copy job compete
with the server for the cores. At ``normal`` priority a CPU-bound neighbour
shares a core with the compute thread, and a frame that arrives while the
neighbour holds the core waits for the scheduler (a p99 several times the
idle one; ``python -m bench --neighbour`` measures it). ``high`` (nice -10)
weights the scheduler towards the service; ``realtime`` (SCHED_FIFO) lets a
waking service thread preempt any normal process at once. Both need the
right to raise priority (root, CAP_SYS_NICE, or an rtprio/nice limit in
/etc/security/limits.conf); without it the server refuses to start rather
than run an experiment at a priority nobody chose.

The setting is applied to the thread that starts the service and inherited
by the threads it creates (Linux keeps nice, policy and affinity per
thread); the starting thread gets its own back afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from calm_rt.errors import ConfigError

__all__ = ["PRIORITIES", "claim_cpu"]

PRIORITIES = ("normal", "high", "realtime")
HIGH_NICE = -10
REALTIME_PRIORITY = 20  # SCHED_FIFO 1-99; above the kernel's default IRQ threads (50) is unwise

_HOW_TO_GRANT = (
    "run the server as root, give python the capability "
    '(sudo setcap cap_sys_nice+ep "$(readlink -f "$(command -v python)")"), or allow the '
    "user in /etc/security/limits.conf ('@lab - rtprio 50' / '@lab - nice -10'); "
    "or start with priority 'normal'"
)


def check_cpus(cpus: tuple[int, ...]) -> None:
    """Refuse CPU numbers this process may not run on (before anything binds)."""
    if not cpus:
        return
    allowed = os.sched_getaffinity(0)
    bad = sorted(set(cpus) - allowed)
    if bad:
        raise ConfigError(
            f"cpus {bad} are not available to this process; allowed: {sorted(allowed)}"
        )


def claim_cpu(priority: str, cpus: tuple[int, ...] = ()) -> Callable[[], None]:
    """Set the calling thread's priority and CPU affinity; return what restores them.

    Threads started after this call inherit the setting. Raises
    :class:`~calm_rt.errors.ConfigError` (saying how to grant it) when the
    process may not raise its priority.
    """
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    check_cpus(cpus)
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # pid 0: the calling thread, on Linux
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    affinity = os.sched_getaffinity(0)
    try:
        if priority == "high":
            os.setpriority(os.PRIO_PROCESS, 0, HIGH_NICE)
        elif priority == "realtime":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except PermissionError as exc:
        raise ConfigError(
            f"priority {priority!r} is not permitted for this process ({exc.strerror}): "
            + _HOW_TO_GRANT
        ) from exc
    if cpus:
        os.sched_setaffinity(0, cpus)

    def restore() -> None:
        if cpus:
            os.sched_setaffinity(0, affinity)
        if priority == "realtime":
            os.sched_setscheduler(0, policy, param)
        elif priority == "high":
            try:  # lowering priority back is always allowed, raising it back may not be
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except PermissionError:
                pass

    return restore
