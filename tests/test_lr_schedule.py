"""Warm-up and decay shapes of the learning-rate schedule, and resuming it."""

import math

import pytest
import torch

from megagrow.errors import UserError
from megagrow.training.lr_schedule import LRScheduleConfig, LRScheduler, learning_rate


def test_warmup_then_cosine_to_min_lr():
    cfg = LRScheduleConfig(lr=4e-4, min_lr=4e-5, warmup_steps=10, decay_steps=110, decay_style="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(4e-5)
    assert learning_rate(cfg, 9) == pytest.approx(4e-4)
    assert learning_rate(cfg, 60) == pytest.approx(4e-5 + 0.5 * (4e-4 - 4e-5))
    assert learning_rate(cfg, 110) == pytest.approx(4e-5)
    assert learning_rate(cfg, 10_000) == pytest.approx(4e-5)
    lrs = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_constant_and_inverse_sqrt():
    lin = LRScheduleConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=100, decay_style="linear")
    assert learning_rate(lin, 25) == pytest.approx(0.75)
    const = LRScheduleConfig(lr=1.0, warmup_steps=4, decay_steps=10, decay_style="constant")
    assert learning_rate(const, 1) == pytest.approx(0.5) and learning_rate(const, 50) == 1.0
    isr = LRScheduleConfig(lr=1.0, min_lr=0.01, warmup_steps=4, decay_steps=10, decay_style="inverse-square-root")
    assert learning_rate(isr, 16) == pytest.approx(math.sqrt(4) / math.sqrt(16))


def test_bad_settings_are_rejected():
    with pytest.raises(UserError, match="--lr-decay-style"):
        LRScheduleConfig(lr=1.0, decay_style="exp")
    with pytest.raises(UserError, match="--min-lr"):
        LRScheduleConfig(lr=1e-4, min_lr=1e-3)


def test_scheduler_sets_groups_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=123.0)
    cfg = LRScheduleConfig(lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=20)
    sched = LRScheduler(opt, cfg)
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    resumed = LRScheduler(torch.optim.SGD(params, lr=5.0), cfg)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == learning_rate(cfg, 7)
