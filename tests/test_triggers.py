"""Closed-loop trigger rules: parsing, refractoriness, and lead time on simulated ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calm_rt.errors import ConfigError
from calm_rt.live.triggers import TriggerRule, TriggerSet, load_rules


def test_rule_fires_above_threshold_and_respects_refractory():
    rules = TriggerSet(n_neurons=4)
    rules.add(
        TriggerRule.from_dict(
            {
                "name": "A",
                "neurons": [0, 1],
                "window_ms": 100,
                "threshold": 1.0,
                "refractory_ms": 500,
            }
        )
    )
    hot = np.zeros((4, 16), np.float32)
    hot[:2, :3] = 2.0  # 100 ms at 30 Hz = 3 frames
    assert [e.rule for e in rules.evaluate(hot, 30.0, seq=0, now_s=0.0)] == ["A"]
    assert rules.evaluate(hot, 30.0, seq=1, now_s=0.2) == []  # refractory
    assert len(rules.evaluate(hot, 30.0, seq=2, now_s=0.6)) == 1
    cold = hot.copy()
    cold[:2, :3] = 0.5
    assert rules.evaluate(cold, 30.0, seq=3, now_s=2.0) == []
    assert rules.fired == 2


def test_below_direction_and_window_mean():
    rules = TriggerSet()
    rules.add(
        TriggerRule.from_dict(
            {
                "name": "dip",
                "neurons": [2],
                "window_ms": 300,
                "threshold": -1.0,
                "direction": "below",
            }
        )
    )
    f = np.zeros((3, 16), np.float32)
    f[2, :9] = -2.0
    event = rules.evaluate(f, 30.0, seq=5, now_s=0.0)[0]
    assert event.value == pytest.approx(-2.0) and event.lead_frames == 9


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"neurons": [1]}, "needs 'name'"),
        ({"name": "x", "neurons": []}, "at least one neuron"),
        ({"name": "x", "neurons": [1], "window_ms": 0}, "window_ms"),
        ({"name": "x", "neurons": [1], "direction": "sideways"}, "direction"),
        ({"name": "x", "neurons": [1], "colour": "red"}, "unknown trigger field"),
    ],
)
def test_bad_rules_are_refused(rule, message):
    with pytest.raises(ConfigError, match=message):
        TriggerRule.from_dict(rule)


def test_neuron_indices_checked_against_the_session():
    rules = TriggerSet(n_neurons=3)
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        rules.add(TriggerRule("A", (5,)))


def test_rules_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps({"rules": [{"name": "A", "neurons": [1, 2]}, {"name": "B", "neurons": [0]}]})
    )
    assert [r.name for r in load_rules(path)] == ["A", "B"]
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(path)


@pytest.mark.slow
def test_forecast_triggers_anticipate_real_ensemble_events():
    """On the simulator, where the truth is known: triggers on CalM's forecast of a
    stimulus-driven ensemble fire before the ensemble's true activity crosses the
    threshold, earlier than the same rule on the measured activity."""
    from calm_rt.data import SimConfig, make_animal, simulate_session
    from calm_rt.live.engine import EngineConfig, StreamingEngine
    from calm_rt.model import load_checkpoint

    cfg = SimConfig(neurons=60, frames=3000, indicator="GCaMP6f", seed=21)
    session, truth = simulate_session(cfg, make_animal(cfg, 0), 0)
    ensemble = [i for i, t in enumerate(truth.neuron_types) if t == "stimulus"]
    assert len(ensemble) >= 5
    model, _ = load_checkpoint()
    engine = StreamingEngine(model, EngineConfig(n_neurons=60, fps=30.0))
    forecast_rules, now_rules = TriggerSet(60), TriggerSet(60)
    rule = {
        "name": "ens",
        "neurons": ensemble,
        "window_ms": 300,
        "threshold": 1.0,
        "refractory_ms": 1000,
    }
    forecast_rules.add(TriggerRule.from_dict(rule))
    now_rules.add(TriggerRule.from_dict(rule))
    fired_forecast, fired_now = [], []
    for t in range(cfg.frames):
        pred = engine.step(session.traces[:, t], seq=t, neuropil=session.neuropil[:, t])
        if t < 900:  # let the running baseline and normalisation settle (30 s)
            continue
        fired_forecast += [t for _ in forecast_rules.evaluate(pred.forecast, 30.0, t, t / 30.0)]
        now_value = np.repeat(np.nan_to_num(pred.activity)[:, None], pred.forecast.shape[1], axis=1)
        fired_now += [t for _ in now_rules.evaluate(now_value, 30.0, t, t / 30.0)]
    # Real events: the ensemble's true calcium rises through its 90th percentile.
    true = truth.calcium[ensemble].mean(0)
    level = np.percentile(true[900:], 90)
    crossings = [t for t in range(901, cfg.frames) if true[t - 1] < level <= true[t]]
    crossings = [t for i, t in enumerate(crossings) if i == 0 or t - crossings[i - 1] > 30]

    def first_before(events: list[int], fired: list[int]) -> tuple[float, float]:
        leads = []
        for e in events:
            near = [e - f for f in fired if -5 <= e - f <= 30]
            if near:
                leads.append(max(near))
        return len(leads) / max(len(events), 1), float(np.median(leads)) if leads else float("nan")

    hit_f, lead_f = first_before(crossings, fired_forecast)
    hit_n, lead_n = first_before(crossings, fired_now)
    print(
        f"events {len(crossings)}; forecast: hit {hit_f:.2f}, lead {lead_f} frames; now: hit {hit_n:.2f}, lead {lead_n}"
    )
    assert hit_f >= 0.5
    assert lead_f > lead_n
