"""Learning-rate and weight-decay schedule, step for step megatron-core's OptimizerParamScheduler.

Megatron-LM counts its schedule in samples (it advances by the global batch each optimizer
step) and sets the rate for step k from the k steps taken before it, so with warm-up the first
update uses `--lr-warmup-init` (0 by default) and step `--lr-warmup-iters` is the first at the
peak. Decay (constant, linear, cosine, inverse-square-root or WSD) runs from the end of warm-up
to `--lr-decay-iters` and holds `--min-lr` after. Weight decay goes from `--start-weight-decay`
to `--end-weight-decay` over the run (`--weight-decay-incr-style`). The formulas are written
here from that behaviour; tests/test_lr_schedule.py steps megatron-core's scheduler beside this
one for every style.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megagrow.errors import UserError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass
class LRScheduleConfig:
    """Settings of the schedule, in samples as Megatron-LM counts them (optimizer steps x global batch)."""

    lr: float
    min_lr: float = 0.0
    warmup_samples: float = 0  # fractional with --lr-warmup-fraction, as in Megatron-LM
    decay_samples: int | None = None  # None: no decay after warm-up
    decay_style: str = "cosine"
    init_lr: float = 0.0  # --lr-warmup-init: the rate of the first warm-up step
    wsd_decay_samples: int | None = None  # WSD: the final annealing phase
    wsd_decay_style: str = "exponential"
    start_wd: float | None = None  # None: the optimizer groups keep the weight decay they were built with
    end_wd: float | None = None
    wd_incr_samples: int | None = None
    wd_incr_style: str = "constant"
    global_batch_size: int = 1  # samples per optimizer step

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise UserError(f"--lr-decay-style {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise UserError(f"--lr-wsd-decay-style {self.wsd_decay_style!r} is not one of "
                            f"{', '.join(WSD_DECAY_STYLES)}")
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise UserError(f"--weight-decay-incr-style {self.wd_incr_style!r} is not one of "
                            f"{', '.join(WD_INCR_STYLES)}")
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}; lower --min-lr")
        if not 0.0 <= self.init_lr <= self.lr:
            raise UserError(f"--lr-warmup-init {self.init_lr} is outside [0, --lr {self.lr}]; warm up from 0 or "
                            f"a rate below the peak")
        if self.decay_samples is not None and self.decay_samples < self.warmup_samples:
            raise UserError(
                f"--lr-decay-iters ({self.decay_samples // self.global_batch_size} iterations; default: "
                f"--train-iters) is shorter than the warm-up "
                f"({self.warmup_samples / self.global_batch_size:g} iterations); lengthen the decay or shorten the "
                f"warm-up")
        if self.decay_style == "WSD":
            if not self.wsd_decay_samples:
                raise UserError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples): the "
                                "length of its final annealing phase")
            if self.decay_samples is not None and self.wsd_decay_samples > self.decay_samples:
                raise UserError("--lr-wsd-decay-iters is longer than the decay (--lr-decay-iters, default "
                                "--train-iters); shorten the annealing phase")
        if (self.start_wd is None) != (self.end_wd is None):
            raise UserError("give both --start-weight-decay and --end-weight-decay")
        if self.start_wd is not None:
            if not 0.0 <= self.start_wd <= self.end_wd:
                raise UserError(f"--start-weight-decay {self.start_wd} must be >= 0 and at most --end-weight-decay "
                                f"{self.end_wd} (weight decay only increases, as in Megatron-LM)")
            if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
                raise UserError("--start-weight-decay and --end-weight-decay differ but --weight-decay-incr-style "
                                "is constant; choose linear or cosine")


def _decay_coefficient(config: LRScheduleConfig, samples: int) -> float:
    """Where between min_lr (0) and lr (1) the rate sits after warm-up, before decay_samples."""
    progress = (samples - config.warmup_samples) / (config.decay_samples - config.warmup_samples)
    if config.decay_style == "linear":
        return 1.0 - progress
    if config.decay_style == "cosine":
        return 0.5 * (math.cos(math.pi * progress) + 1.0)
    anneal_start = config.decay_samples - config.wsd_decay_samples  # WSD: stable, then anneal
    if samples <= anneal_start:
        return 1.0
    anneal = (samples - anneal_start) / config.wsd_decay_samples
    if config.wsd_decay_style == "linear":
        return 1.0 - anneal
    if config.wsd_decay_style == "cosine":
        return 0.5 * (math.cos(math.pi * anneal) + 1.0)
    if config.wsd_decay_style == "exponential":
        return 2.0 * math.pow(0.5, anneal) - 1.0
    return 1.0 - math.sqrt(anneal)  # minus_sqrt


def learning_rate(config: LRScheduleConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based: after `step` updates have been taken)."""
    samples = step * config.global_batch_size
    if config.warmup_samples > 0 and samples <= config.warmup_samples:
        return config.init_lr + (config.lr - config.init_lr) * samples / config.warmup_samples
    if config.decay_style == "constant" or config.decay_samples is None:
        return config.lr
    if samples > config.decay_samples:
        return config.min_lr
    if config.decay_style == "inverse-square-root":
        # Counted in samples, floored at one: without warm-up the rate depends on the batch size.
        return max(config.min_lr, config.lr * math.sqrt(max(config.warmup_samples, 1)) / math.sqrt(max(samples, 1)))
    return config.min_lr + _decay_coefficient(config, samples) * (config.lr - config.min_lr)


def weight_decay(config: LRScheduleConfig, step: int) -> float | None:
    """Weight decay of optimizer step `step` for decayed parameters (None: no schedule, keep the groups')."""
    if config.start_wd is None:
        return None
    samples = step * config.global_batch_size
    if config.wd_incr_style == "constant" or not config.wd_incr_samples or samples > config.wd_incr_samples:
        return config.end_wd
    progress = samples / config.wd_incr_samples
    coeff = progress if config.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - progress)) + 1.0)
    return config.start_wd + coeff * (config.end_wd - config.start_wd)


class LRScheduler:
    """Sets the learning rate (and scheduled weight decay) of every optimizer param group each step; checkpointable."""

    def __init__(self, optimizer, config: LRScheduleConfig):
        self.optimizer = optimizer
        self.config = config
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = learning_rate(self.config, self.num_steps)
        decay = weight_decay(self.config, self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            if decay is not None:
                group["weight_decay"] = decay * group.get("wd_mult", 1.0)

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
