"""Dynamic loss scaling for fp16: grow the scale while gradients stay finite, back off on overflow."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScalerConfig:
    """Megatron's defaults: start at 2^32, halve on overflow after `hysteresis` hits, double every 1000 clean steps."""

    initial_scale: float = 2.0**32
    min_scale: float = 1.0
    growth_interval: int = 1000
    hysteresis: int = 2


class DynamicLossScaler:
    """Tracks the fp16 loss scale across steps; checkpointable."""

    def __init__(self, config: LossScalerConfig | None = None):
        self.config = config or LossScalerConfig()
        self.scale = self.config.initial_scale
        self._clean_steps = 0
        self._hysteresis_left = self.config.hysteresis

    def update(self, found_overflow: bool) -> None:
        """Adjust the scale after a step whose gradients did (not) overflow."""
        if found_overflow:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.config.min_scale)
            return
        self._clean_steps += 1
        if self._clean_steps == self.config.growth_interval:
            self._clean_steps = 0
            self._hysteresis_left = self.config.hysteresis
            self.scale *= 2.0

    def state_dict(self) -> dict:
        """Scale and counters (plain types)."""
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left,
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the saved scale and counters."""
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
