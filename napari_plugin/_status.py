"""The live view's status line, from the server's ``status`` and the view's own counters."""

from __future__ import annotations

from typing import Any

from napari_plugin._feed import Snapshot

__all__ = ["status_text"]


def status_text(snap: Snapshot, source: str, shown: int) -> str:
    """The status line: input rate, latency, losses, triggers (server status + our own stats)."""
    parts = []
    st, rig = snap.status or {}, snap.rig or {}
    heard = rig.get("forecast", {}).get("received", 0)
    parts.append(f"{'connected to' if heard else 'waiting for'} {source}")
    if st:
        parts.append(
            f"input {st.get('fps_in', 0):.1f} fps · server latency p50 {st.get('latency_p50_ms', 0):.1f}"
            f" / p99 {st.get('latency_p99_ms', 0):.1f} ms"
        )
    fc = rig.get("forecast", {})
    if fc.get("received"):
        parts.append(f"frame-in to here p50 {fc['p50_ms']:.1f} / p99 {fc['p99_ms']:.1f} ms")
    if st:
        parts.append(
            f"skipped {st.get('skipped', 0)} · lost {st.get('lost', 0)} · rejected {st.get('rejected', 0)}"
            f" · missed here {fc.get('gaps', 0)}"
        )
        parts.append(f"triggers fired {st.get('triggers_fired', 0)}")
        cal = st.get("calibration")
        if cal:
            parts.append(_calibration_text(cal))
    elif snap.triggers_seen:
        parts.append(f"triggers {snap.triggers_seen}")
    if snap.frames_received:
        parts.append(
            f"frames shown {shown} of {snap.frames_received} (dropped for display {snap.display_dropped})"
        )
    if snap.error:
        parts.append(f"error: {snap.error}")
    return "\n".join(parts)


def _calibration_text(cal: dict[str, Any]) -> str:
    """The behaviour readout's cross-validated R² per variable, or the calibration's progress."""
    if not cal.get("r2"):
        return f"calibrating behaviour {cal['frames']}/{cal['target']} frames"
    scores = [
        f"{name} {'n/a' if r2 is None else f'{r2:.2f}'}"
        for name, r2 in zip(cal.get("names") or range(len(cal["r2"])), cal["r2"])
    ]
    return "behaviour readout R² (cross-validated): " + ", ".join(scores)
