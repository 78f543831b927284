"""The LR and weight-decay schedule: its shapes, its flags, resuming it, and step-for-step
agreement with megatron-core's own OptimizerParamScheduler."""

import math

import pytest
import torch

from megagrow.arguments import parse_args
from megagrow.checkpoint.megatron_state import scheduler_state, scheduler_steps
from megagrow.errors import UserError
from megagrow.training.lr_schedule import LRScheduleConfig, LRScheduler, learning_rate, weight_decay
from megagrow.training.optimization import lr_schedule_config

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "100", "--mock-data"]


def test_warmup_starts_at_init_and_reaches_the_peak_at_its_last_step():
    # As Megatron-LM: step k (after k updates) warms up to k/W of the way; step W is at the peak.
    cfg = LRScheduleConfig(lr=4e-4, min_lr=4e-5, warmup_samples=10, decay_samples=110, decay_style="cosine")
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 5) == pytest.approx(2e-4)
    assert learning_rate(cfg, 10) == pytest.approx(4e-4)
    assert learning_rate(cfg, 60) == pytest.approx(4e-5 + 0.5 * (4e-4 - 4e-5))
    assert learning_rate(cfg, 110) == pytest.approx(4e-5)
    assert learning_rate(cfg, 10_000) == pytest.approx(4e-5)
    lrs = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    warm = LRScheduleConfig(lr=1.0, init_lr=0.2, warmup_samples=4, decay_samples=10)
    assert learning_rate(warm, 0) == pytest.approx(0.2) and learning_rate(warm, 2) == pytest.approx(0.6)


def test_linear_constant_inverse_sqrt_and_wsd():
    lin = LRScheduleConfig(lr=1.0, min_lr=0.0, decay_samples=100, decay_style="linear")
    assert learning_rate(lin, 25) == pytest.approx(0.75)
    const = LRScheduleConfig(lr=1.0, warmup_samples=4, decay_samples=10, decay_style="constant")
    assert learning_rate(const, 2) == pytest.approx(0.5) and learning_rate(const, 50) == 1.0
    isr = LRScheduleConfig(lr=1.0, min_lr=0.01, warmup_samples=4, decay_samples=100, decay_style="inverse-square-root")
    assert learning_rate(isr, 16) == pytest.approx(math.sqrt(4) / math.sqrt(16))
    assert learning_rate(isr, 101) == 0.01  # past the decay: min_lr, as for every style
    wsd = LRScheduleConfig(lr=1.0, min_lr=0.1, decay_samples=100, decay_style="WSD", wsd_decay_samples=20,
                           wsd_decay_style="linear")
    assert learning_rate(wsd, 80) == 1.0 and learning_rate(wsd, 90) == pytest.approx(0.55)


def test_weight_decay_rises_only_when_scheduled():
    assert weight_decay(LRScheduleConfig(lr=1.0), 3) is None
    rising = LRScheduleConfig(lr=1.0, start_wd=0.0, end_wd=0.1, wd_incr_samples=10, wd_incr_style="linear")
    assert [weight_decay(rising, s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "wd_mult": 1.0}, {"params": params[1:], "wd_mult": 0.0}])
    sched = LRScheduler(opt, rising)
    for _ in range(5):
        sched.step()
    assert [group["weight_decay"] for group in opt.param_groups] == pytest.approx([0.05, 0.0])


def test_bad_settings_are_rejected_in_one_line():
    for kwargs, flag in (({"decay_style": "exp"}, "--lr-decay-style"), ({"min_lr": 2.0}, "--min-lr"),
                         ({"init_lr": 2.0}, "--lr-warmup-init"), ({"decay_style": "WSD"}, "--lr-wsd-decay-iters"),
                         ({"start_wd": 0.1, "end_wd": 0.0, "wd_incr_style": "linear"}, "--start-weight-decay")):
        with pytest.raises(UserError, match=flag):
            LRScheduleConfig(lr=1.0, **kwargs)
    with pytest.raises(UserError, match="--weight-decay-incr-style linear needs --start-weight-decay"):
        parse_args([*MODEL, "--train-iters", "10", "--weight-decay-incr-style", "linear"])
    with pytest.raises(UserError, match="need --weight-decay-incr-style linear or cosine"):
        parse_args([*MODEL, "--train-iters", "10", "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"])


def test_scheduler_sets_groups_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=123.0)
    cfg = LRScheduleConfig(lr=1.0, min_lr=0.1, warmup_samples=2, decay_samples=20)
    sched = LRScheduler(opt, cfg)
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    resumed = LRScheduler(torch.optim.SGD(params, lr=5.0), cfg)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == learning_rate(cfg, 7)


# Flags of a Megatron-LM launch script -> (megagrow's schedule, megatron-core's scheduler), compared
# at every step. Each case exercises one branch of the schedule.
SCHEDULE_CASES = {
    "cosine, warm-up, decay shorter than the run": ["--lr-decay-style", "cosine", "--lr-warmup-iters", "4",
                                                    "--lr-decay-iters", "30"],
    "linear from --lr-warmup-init": ["--lr-decay-style", "linear", "--lr-warmup-iters", "5", "--lr-warmup-init",
                                     "1e-4"],
    "constant after warm-up": ["--lr-decay-style", "constant", "--lr-warmup-iters", "3"],
    "inverse sqrt, no warm-up": ["--lr-decay-style", "inverse-square-root"],
    "inverse sqrt, warm-up": ["--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", "6"],
    "fractional --lr-warmup-fraction": ["--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.13"],
    "WSD exponential (default)": ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "12", "--lr-warmup-iters", "2"],
    "WSD linear, in samples": ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
                               "--lr-wsd-decay-samples", "64", "--lr-decay-samples", "256"],
    "WSD cosine": ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "cosine", "--lr-wsd-decay-iters", "10"],
    "WSD minus_sqrt": ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "minus_sqrt", "--lr-wsd-decay-iters", "9"],
    "weight decay linear": ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01",
                            "--end-weight-decay", "0.1", "--lr-warmup-samples", "24"],
    "weight decay cosine": ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.0",
                            "--end-weight-decay", "0.05"],
}
TRAIN_ITERS = 40


def _megatron_core_scheduler(optimizer, train):
    """megatron-core's scheduler built from the run's flags as Megatron-LM's training.py builds it."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    batch = train.global_batch_size
    decay = (train.lr_decay_iters or train.train_iters) * batch
    warmup = (train.lr_warmup_fraction * decay if train.lr_warmup_fraction is not None
              else train.lr_warmup_iters * batch)
    constant = train.weight_decay_incr_style == "constant"
    return OptimizerParamScheduler(
        optimizer, init_lr=train.lr_warmup_init, max_lr=train.lr, min_lr=train.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay if constant else train.start_weight_decay,
        end_wd=train.weight_decay if constant else train.end_weight_decay,
        wd_incr_steps=train.train_iters * batch, wd_incr_style=train.weight_decay_incr_style,
        wsd_decay_steps=train.lr_wsd_decay_iters * batch if train.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=train.lr_wsd_decay_style)


def _groups():
    decayed, not_decayed = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return [{"params": [decayed], "wd_mult": 1.0}, {"params": [not_decayed], "wd_mult": 0.0}]


@pytest.mark.parametrize("global_batch", [1, 8])
@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_every_step_equals_megatron_core(case, global_batch):
    pytest.importorskip("megatron.core.optimizer_param_scheduler")
    flags = [*MODEL, "--train-iters", str(TRAIN_ITERS), "--global-batch-size", str(global_batch),
             "--lr", "3e-4", "--min-lr", "3e-5", *SCHEDULE_CASES[case]]
    train = parse_args(flags).train
    ours = torch.optim.AdamW(_groups(), lr=1.0)
    theirs = torch.optim.AdamW(_groups(), lr=1.0)
    scheduler = LRScheduler(ours, lr_schedule_config(train, TRAIN_ITERS))
    reference = _megatron_core_scheduler(theirs, train)
    for step in range(TRAIN_ITERS + 3):
        for mine, megatron in zip(ours.param_groups, theirs.param_groups):
            assert mine["lr"] == pytest.approx(megatron["lr"], rel=1e-12, abs=0), (case, step)
            assert mine["weight_decay"] == pytest.approx(megatron["weight_decay"], rel=1e-12, abs=0), (case, step)
        scheduler.step()
        reference.step(increment=global_batch)


def test_the_checkpoint_record_loads_in_megatron_core_and_back():
    pytest.importorskip("megatron.core.optimizer_param_scheduler")
    flags = [*MODEL, "--train-iters", str(TRAIN_ITERS), "--global-batch-size", "8", "--lr", "3e-4", "--min-lr",
             "3e-5", *SCHEDULE_CASES["weight decay linear"]]
    train = parse_args(flags).train
    schedule = lr_schedule_config(train, TRAIN_ITERS)
    ours = LRScheduler(torch.optim.AdamW(_groups(), lr=1.0), schedule)
    for _ in range(7):
        ours.step()
    record = scheduler_state(ours.num_steps, ours.state_dict()["config"])
    # Megatron-LM without --override-opt_param-scheduler asserts that every setting matches its flags.
    theirs = torch.optim.AdamW(_groups(), lr=1.0)
    reference = _megatron_core_scheduler(theirs, train)
    reference.load_state_dict(record)
    assert [g["lr"] for g in theirs.param_groups] == pytest.approx([g["lr"] for g in ours.optimizer.param_groups])
    assert theirs.param_groups[0]["weight_decay"] == pytest.approx(ours.optimizer.param_groups[0]["weight_decay"])
    # And megagrow resumes from megatron-core's own record at the same step.
    reference.step(increment=8)
    resumed = LRScheduler(torch.optim.AdamW(_groups(), lr=1.0), schedule)
    resumed.load_state_dict({"num_steps": scheduler_steps(reference.state_dict(), train.global_batch_size)})
    assert resumed.num_steps == 8 and resumed.get_lr() == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
