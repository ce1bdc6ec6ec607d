"""Closed-loop triggers: declarative rules evaluated on every prediction.

A rule reads "when the forecast mean of these neurons over the next
``window_ms`` exceeds ``threshold`` (in s.d. of normalised activity), fire
trigger ``name``, then stay quiet for ``refractory_ms``". Rules come from the
CLI, a JSON file or the control socket, as plain dicts::

    {"name": "A", "neurons": [3, 17, 42], "window_ms": 300,
     "threshold": 2.0, "refractory_ms": 500}

Optional ``"direction": "below"`` fires when the mean falls under the
threshold instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calm_rt.errors import ConfigError

__all__ = ["TriggerEvent", "TriggerRule", "TriggerSet", "load_rules"]


@dataclass(frozen=True)
class TriggerRule:
    name: str
    neurons: tuple[int, ...]
    window_ms: float = 300.0
    threshold: float = 2.0
    refractory_ms: float = 500.0
    direction: str = "above"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriggerRule:
        if not isinstance(data, dict):
            raise ConfigError(f"a trigger rule is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"unknown trigger field(s) {sorted(unknown)}; see docs/protocol.md")
        name, neurons = data.get("name"), data.get("neurons")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"a trigger rule needs 'name' (a non-empty string), got {_short(name)}"
            )
        # Exact types, not coercion: int(True) or int(1.7) would watch a neuron nobody named.
        if isinstance(neurons, np.ndarray):
            neurons = neurons.tolist()
        if not isinstance(neurons, (list, tuple)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in neurons
        ):
            raise ConfigError(
                f"rule {name!r}: 'neurons' must be a list of neuron indices (integers), "
                f"got {_short(neurons)}"
            )
        if not neurons:
            raise ConfigError(f"rule {name!r}: a trigger rule needs at least one neuron")
        numbers = {}
        for key, default in (("window_ms", 300.0), ("threshold", 2.0), ("refractory_ms", 500.0)):
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"rule {name!r}: {key!r} must be a number, got {_short(value)}")
            number = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
            if not math.isfinite(number):
                raise ConfigError(f"rule {name!r}: {key!r} must be finite, got {_short(value)}")
            numbers[key] = number
        direction = data.get("direction", "above")
        if direction not in ("above", "below"):
            raise ConfigError(f"direction must be 'above' or 'below', got {_short(direction)}")
        rule = cls(
            name=name, neurons=tuple(int(i) for i in neurons), direction=direction, **numbers
        )
        if rule.window_ms <= 0 or rule.refractory_ms < 0:
            raise ConfigError("window_ms must be > 0 and refractory_ms >= 0")
        return rule

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "neurons": list(self.neurons)}


@dataclass(frozen=True)
class TriggerEvent:
    rule: str
    seq: int
    value: float
    threshold: float
    lead_frames: int  # the forecast window the rule looked at, in frames


class TriggerSet:
    """The active rules and their refractory clocks (one per rule)."""

    def __init__(self, n_neurons: int | None = None) -> None:
        self.rules: dict[str, TriggerRule] = {}
        self._last_fired: dict[str, float] = {}
        self.n_neurons = n_neurons
        self.fired = 0

    def check(self, rule: TriggerRule, n_neurons: int | None = None) -> None:
        """Raise :class:`ConfigError` unless ``rule``'s neurons exist (in ``n_neurons`` or the bound count)."""
        n = self.n_neurons if n_neurons is None else n_neurons
        if min(rule.neurons) < 0 or (n is not None and max(rule.neurons) >= n):
            bound = f"[0, {n})" if n is not None else ">= 0"
            raise ConfigError(
                f"rule {rule.name!r}: neuron indices must be in {bound}, got {_short(list(rule.neurons))}"
            )

    def add(self, rule: TriggerRule) -> None:
        self.check(rule)
        self.rules[rule.name] = rule
        self._last_fired.pop(rule.name, None)

    def bind(self, n_neurons: int) -> None:
        """Fix the neuron count (a session began); every rule must fit it."""
        for rule in self.rules.values():
            self.check(rule, n_neurons)
        self.n_neurons = n_neurons

    def remove(self, name: str) -> None:
        if name not in self.rules:
            raise ConfigError(f"no trigger named {name!r}; active: {sorted(self.rules)}")
        del self.rules[name]

    def evaluate(
        self, forecast: np.ndarray, fps: float, seq: int, now_s: float
    ) -> list[TriggerEvent]:
        """Fire every rule whose condition holds on ``forecast [N, H]`` at time ``now_s``."""
        events = []
        for rule in self.rules.values():
            frames = max(1, min(forecast.shape[1], int(round(rule.window_ms / 1000.0 * fps))))
            idx = [i for i in rule.neurons if i < forecast.shape[0]]
            if not idx:
                continue
            value = float(forecast[idx, :frames].mean())
            hit = value > rule.threshold if rule.direction == "above" else value < rule.threshold
            last = self._last_fired.get(rule.name)
            if hit and (last is None or (now_s - last) * 1000.0 >= rule.refractory_ms):
                self._last_fired[rule.name] = now_s
                self.fired += 1
                events.append(TriggerEvent(rule.name, seq, value, rule.threshold, frames))
        return events


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a peer's value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_rules(path: str | Path) -> list[TriggerRule]:
    """Rules from a JSON file: a list of rule objects (or ``{"rules": [...]}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read trigger rules from {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("rules", [])
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of trigger rules")
    return [TriggerRule.from_dict(d) for d in data]
