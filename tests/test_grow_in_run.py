"""pretrain_gpt.py --grow-at-tokens: base phase, growth and grown phase in one command, equal to doing them by hand."""

import os

import pytest
from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed

from megagrow.arguments import parse_args
from megagrow.checkpoint.reader import CheckpointReader
from megagrow.errors import UserError
from megagrow.growth import GrowthSpec
from megagrow.growth.in_run import phase_configs, train_with_growth
from megagrow.growth.run_state import RunStateOptions
from megagrow.growth.stacking import stack_checkpoint
from megagrow.parallel import state
from megagrow.checkpoint.layout import load_shard, read_tracker
from megagrow.training.trainer import Trainer

TOKENS_PER_ITERATION = 4 * 16  # global batch x seq length


def _flags(data_prefix, layers, extra=()):
    return ["--model-preset", "tiny", "--num-layers", str(layers), "--vocab-size", "1000", "--seq-length", "16",
            "--data-path", data_prefix, "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-interval", "0",
            "--eval-iters", "1", "--pipeline-model-parallel-size", "2", *extra]


def _run(flags, world=2):
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", RANK=str(dist.get_rank()),
                      LOCAL_RANK=str(dist.get_rank()))
    config = parse_args(flags)
    state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp)
    try:
        if config.train.grow_at_tokens:
            trainer = train_with_growth(config.model, config.parallel, config.train, config.data)
        else:
            trainer = Trainer(config.model, config.parallel, config.train, config.data)
            trainer.run()
        return trainer.losses
    finally:
        state.destroy()


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "docs", random_documents(3, 300, 60))


def test_growing_in_the_run_equals_the_two_step_recipe(tmp_path, data_prefix):
    ckpt = tmp_path / "run"
    growth = ["--grow-at-tokens", str(2 * TOKENS_PER_ITERATION), "--growth-factor", "2", "--stack-optimizer-state"]
    grown_losses = run_distributed(_run, 2, _flags(data_prefix, 2, ["--train-iters", "4", "--save", str(ckpt),
                                                                     "--load", str(ckpt), *growth]))[0]
    assert [i for i, _ in grown_losses] == [3, 4]
    assert read_tracker(ckpt) == 2 and read_tracker(ckpt / "grown") == 4
    assert CheckpointReader(ckpt / "grown").config.num_layers == 4
    assert load_shard(ckpt / "grown", iteration=2, pp_rank=1, pp_size=2)["megagrow"]["growth"]["factor"] == 2

    # By hand: train the base with the whole run's LR schedule, grow with the run state, resume.
    manual = tmp_path / "manual"
    schedule = ["--lr-decay-iters", "4"]
    run_distributed(_run, 2, _flags(data_prefix, 2, ["--train-iters", "2", "--save", str(manual), *schedule]))
    stack_checkpoint(manual, manual / "grown", GrowthSpec("depth:stack", factor=2), progress=False,
                     run_state=RunStateOptions(stack_optimizer_state=True))
    manual_losses = run_distributed(_run, 2, _flags(data_prefix, 4, ["--train-iters", "4", "--load",
                                                                     str(manual / "grown"), *schedule]))[0]
    assert manual_losses == grown_losses  # bit-identical

    # Relaunching the same command later continues the grown phase.
    more = run_distributed(_run, 2, _flags(data_prefix, 2, ["--train-iters", "5", "--save", str(ckpt),
                                                            "--load", str(ckpt), *growth]))[0]
    assert [i for i, _ in more] == [5] and read_tracker(ckpt / "grown") == 5


@pytest.mark.parametrize("extra, message", [
    ([], "--grow-at-tokens needs --save"),
    (["--save", "ckpt", "--grow-at-tokens", "256"], "outside the run's 4 iterations"),
    (["--save", "ckpt", "--growth-factor", "1"], "growth factor must be an integer of at least 2"),
])
def test_impossible_growth_is_refused_before_training(monkeypatch, data_prefix, extra, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_args(_flags(data_prefix, 2, ["--train-iters", "4", "--grow-at-tokens", "64", *extra]))
    with pytest.raises(UserError, match=message):
        phase_configs(config.model, config.train)


def _grow_both_ways(tmp_path, data_prefix, layout: list[str]) -> tuple[list, list]:
    """(in-run growth losses, offline stack + resume losses) for the same flags and optimizer layout."""
    growth = ["--grow-at-tokens", str(2 * TOKENS_PER_ITERATION), "--growth-factor", "2", "--stack-optimizer-state"]
    ckpt = tmp_path / "run"
    in_run = run_distributed(_run, 2, _flags(data_prefix, 2, ["--train-iters", "4", "--save", str(ckpt),
                                                               "--load", str(ckpt), *growth, *layout]))[0]
    manual, schedule = tmp_path / "manual", ["--lr-decay-iters", "4"]
    run_distributed(_run, 2, _flags(data_prefix, 2, ["--train-iters", "2", "--save", str(manual), *schedule,
                                                      *layout]))
    stack_checkpoint(manual, manual / "grown", GrowthSpec("depth:stack", factor=2), progress=False,
                     run_state=RunStateOptions(stack_optimizer_state=True))
    offline = run_distributed(_run, 2, _flags(data_prefix, 4, ["--train-iters", "4", "--load", str(manual / "grown"),
                                                                *schedule, *layout]))[0]
    return in_run, offline


# The pipeline of the other tests is replaced by data parallelism where the layout needs dp ranks.
DATA_PARALLEL = ["--pipeline-model-parallel-size", "1"]


@pytest.mark.parametrize("layout", [
    [*DATA_PARALLEL, "--use-distributed-optimizer"],
    ["--deepspeed", "--zero-stage", "1"],  # with the two pipeline stages
    pytest.param([*DATA_PARALLEL, "--deepspeed", "--zero-stage", "2"], marks=pytest.mark.slow),
    [*DATA_PARALLEL, "--deepspeed", "--zero-stage", "3"],
], ids=["distributed-optimizer", "zero1-pp2", "zero2-dp2", "zero3-dp2"])
def test_growing_in_the_run_equals_the_offline_route_for_every_optimizer_layout(tmp_path, data_prefix, layout):
    # The Adam moments and masters are gathered per parameter from the optimizer's partitions, stacked, and
    # scattered into the grown run's partitions: the same as saving, stacking offline and resuming.
    in_run, offline = _grow_both_ways(tmp_path, data_prefix, layout)
    assert [i for i, _ in in_run] == [3, 4]
    assert in_run == offline
    # The run really trained under that layout, and its grown checkpoint carries the stacked Adam state.
    grown = CheckpointReader(tmp_path / "run" / "grown", iteration=2)
    train = grown.common["megagrow"]["config"]["train"]
    assert (train["deepspeed"], train["use_distributed_optimizer"]) == ("--deepspeed" in layout,
                                                                         "--use-distributed-optimizer" in layout)
    assert grown.has_optimizer_state and grown.optimizer_steps() == 2
