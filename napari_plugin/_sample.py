"""Sample data: a small simulated two-photon movie with its ROI labels."""

from __future__ import annotations

from typing import Any

__all__ = ["simulated_movie_sample"]


def simulated_movie_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """A 10 s, 128 x 128 simulated movie of 24 neurons (uint16) and their labels."""
    from calm_rt.serve.demo import demo_movie

    demo = demo_movie(neurons=24, size=128, frames=300, fps=30.0, seed=1)
    meta = {"fps": demo.fps, "behavior": demo.behavior, "behavior_names": demo.behavior_names}
    return [
        (demo.movie, {"name": "calm-rt simulated movie", "metadata": meta}, "image"),
        (demo.labels, {"name": "calm-rt ROIs", "opacity": 0.35}, "labels"),
    ]
