"""Learning-rate schedule: linear warm-up, then constant, linear, cosine or inverse-sqrt decay.

Matches Megatron's `--lr --min-lr --lr-warmup-iters --lr-decay-iters --lr-decay-style`:
warm-up goes linearly from 0 to `lr` over `warmup_steps`; decay then runs from `lr` to
`min_lr` between step `warmup_steps` and `decay_steps` and holds `min_lr` after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megagrow.errors import UserError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass
class LRScheduleConfig:
    """Settings of the learning-rate schedule (steps are optimizer steps)."""

    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: no decay after warm-up
    decay_style: str = "cosine"

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise UserError(f"--lr-decay-style {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}; lower --min-lr")
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise UserError(
                f"--lr-decay-iters {self.decay_steps} (default: --train-iters) is shorter than --lr-warmup-iters "
                f"{self.warmup_steps}; "
                f"lengthen the decay or shorten the warm-up"
            )


def learning_rate(config: LRScheduleConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses step 0)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.decay_style == "constant" or config.decay_steps is None:
        return config.lr
    if config.decay_style == "inverse-square-root":
        # Megatron's rule: lr * sqrt(warmup) / sqrt(step), floored at min_lr.
        warmup = max(config.warmup_steps, 1)
        return max(config.min_lr, config.lr * math.sqrt(warmup) / math.sqrt(max(step, warmup)))
    if step >= config.decay_steps:
        return config.min_lr
    span = config.decay_steps - config.warmup_steps
    progress = (step - config.warmup_steps) / span if span > 0 else 1.0
    if config.decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    return config.min_lr + coeff * (config.lr - config.min_lr)


class LRScheduler:
    """Sets the learning rate of every optimizer param group each step; checkpointable."""

    def __init__(self, optimizer, config: LRScheduleConfig):
        self.optimizer = optimizer
        self.config = config
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = learning_rate(self.config, self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def get_lr(self) -> float:
        """Learning rate the next optimizer step will use."""
        return learning_rate(self.config, self.num_steps)

    def step(self) -> None:
        """Advance one optimizer step."""
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        """Steps taken and the schedule settings (plain types)."""
        return {"num_steps": self.num_steps, "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; the current settings win, as with Megatron's --override-opt_param-scheduler."""
        self.num_steps = int(state["num_steps"])
        self._apply()
