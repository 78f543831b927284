"""Grow during a run: `pretrain_gpt.py --grow-at-tokens D --growth-factor g ...`.

    base phase    the flags' model trains until D tokens (rounded up to whole iterations) and
                  saves to --save, with the LR schedule of the whole run
    growth        rank 0 grows that checkpoint in depth into {save}/grown, in the run's own
                  tp/pp layout, carrying the run state (progress, LR schedule position, RNG,
                  and a fresh optimizer or, with --stack-optimizer-state, stacked Adam moments);
                  the other ranks wait at a barrier
    grown phase   the grown model resumes from {save}/grown at the same iteration, same data
                  position and same LR schedule, to --train-iters/--train-tokens; its
                  checkpoints (and, without --metrics-file, its metrics) go to {save}/grown

Relaunching the same command resumes: from {save}/grown once it holds a checkpoint, else
the base phase from --load as usual. Only megagrow's own non-distributed optimizer is
supported (the carried optimizer state is written in its layout).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from pathlib import Path

import torch.distributed as dist

from megagrow.config import ModelConfig, TrainConfig
from megagrow.errors import UserError
from megagrow.growth.operators import GrowthSpec, grown_config
from megagrow.growth.run_state import RunStateOptions
from megagrow.growth.stacking import stack_checkpoint
from megagrow.checkpoint.layout import read_tracker
from megagrow.training.trainer import Trainer, resolve_train_iters

logger = logging.getLogger("megagrow.training")
GROWN_SUBDIR = "grown"


def growth_spec(train: TrainConfig) -> GrowthSpec:
    """The growth the training flags ask for."""
    return GrowthSpec(operator=train.growth_operator, factor=train.growth_factor)


def growth_iteration(train: TrainConfig, seq_length: int) -> int:
    """Iteration after which the model grows: --grow-at-tokens rounded up to whole global batches."""
    return math.ceil(train.grow_at_tokens / (train.global_batch_size * seq_length))


def _check(train: TrainConfig, grow_at: int, total: int) -> None:
    if not train.save:
        raise UserError("--grow-at-tokens needs --save DIR: the base model is saved there and grown from it")
    if train.deepspeed or train.use_distributed_optimizer:
        raise UserError("--grow-at-tokens supports megagrow's non-distributed optimizer only; drop --deepspeed "
                        "and --use-distributed-optimizer, or grow offline with tools/stack_checkpoint.py")
    if not 0 < grow_at < total:
        raise UserError(f"--grow-at-tokens {train.grow_at_tokens} is iteration {grow_at}, outside the run's "
                        f"{total} iterations; grow after at least one iteration and before the end")


def phase_configs(model: ModelConfig, train: TrainConfig) -> tuple[TrainConfig, ModelConfig, TrainConfig]:
    """(base phase train config, grown model, grown phase train config) of a run with in-run growth."""
    total = resolve_train_iters(train, model.seq_length)
    grow_at = growth_iteration(train, model.seq_length)
    _check(train, grow_at, total)
    spec = growth_spec(train)
    # Both phases follow the LR schedule of the whole run.
    common = {"train_tokens": None, "lr_decay_iters": train.lr_decay_iters or total, "grow_at_tokens": None}
    base = dataclasses.replace(train, train_iters=grow_at, **common)
    split = train.pipeline_layer_split
    grown_dir = str(Path(train.save) / GROWN_SUBDIR)
    grown = dataclasses.replace(train, train_iters=total, load=grown_dir, save=grown_dir,
                                pipeline_layer_split=[count * spec.factor for count in split] if split else None,
                                **common)
    return base, grown_config(model, spec), grown


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_coordinator() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train_with_growth(model: ModelConfig, parallel, train: TrainConfig, data) -> Trainer:
    """Train the base model to --grow-at-tokens, grow it, and train the grown model to the end; returns the last Trainer."""
    base_train, grown_model, grown_train = phase_configs(model, train)
    if read_tracker(grown_train.load) is None:
        base = Trainer(model, parallel, base_train, data)
        base.run()
        if base.progress.iteration < base_train.train_iters:  # stopped by a signal: resume later
            return base
        del base
        gc.collect()
        _barrier()
        if _is_coordinator():
            spec = growth_spec(train)
            logger.info("growing %s at iteration %d by %s x%d into %s", train.save, base_train.train_iters,
                        spec.operator, spec.factor, grown_train.save)
            stack_checkpoint(train.save, grown_train.save, spec, iteration=base_train.train_iters, tp=parallel.tp,
                             pp=parallel.pp, layers_per_stage=grown_train.pipeline_layer_split,
                             run_state=RunStateOptions(stack_optimizer_state=train.stack_optimizer_state),
                             progress=False)
        _barrier()
    grown = Trainer(grown_model, parallel, grown_train, data)
    grown.run()
    return grown
