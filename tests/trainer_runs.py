"""Build a Trainer from command-line flags inside a test worker (imported by the training tests)."""

from __future__ import annotations

import contextlib
import os

from megagrow.arguments import parse_args
from megagrow.parallel import state
from megagrow.training.trainer import Trainer


@contextlib.contextmanager
def trainer_from_flags(flags: list[str], world: int = 1):
    """Parse `flags` as pretrain_gpt.py would on a `world`-rank job, set up the groups, yield the Trainer."""
    os.environ.update(WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    if dist.is_initialized():  # what the launchers would export, for DeepSpeed
        os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()))
    config = parse_args(flags)
    state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp)
    try:
        yield Trainer(config.model, config.parallel, config.train, config.data)
    finally:
        state.destroy()


def train_losses(flags: list[str], world: int = 1) -> list[float]:
    """Run training to the end; the per-iteration losses this rank saw."""
    with trainer_from_flags(flags, world) as trainer:
        trainer.run()
        return [loss for _, loss in trainer.losses]
