"""Grow during a run: `pretrain_gpt.py --grow-at-tokens D --growth-factor g ...`.

    base phase    the flags' model trains until D tokens (rounded up to whole iterations) and
                  saves to --save, with the LR schedule of the whole run
    growth        every rank builds its own stage of the grown model, in the run's tp/pp
                  layout, from its own shard of the saved base and the base layers the other
                  stages send over the pipeline group (megagrow/growth/rank_growth.py): no rank
                  reads another's files, so nodes with local disks grow too. With --stack-optimizer-state the Adam moments and fp32 masters are
                  stacked like the weights, whatever optimizer trains (megagrow's plain or
                  distributed one, DeepSpeed at any ZeRO stage); otherwise the optimizer starts
                  fresh. The grown model is saved at once to {save}/grown
    grown phase   training continues at the same iteration, data position, LR schedule and RNG
                  streams, to --train-iters/--train-tokens; its checkpoints (and, without
                  --metrics-file, its metrics) go to {save}/grown

The result equals the offline route (save, tools/stack_checkpoint.py with the run state,
resume) loss for loss. Relaunching the same command resumes: from {save}/grown once it holds
a checkpoint, else the base phase from --load as usual.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from pathlib import Path

from megagrow.config import ModelConfig, TrainConfig
from megagrow.errors import UserError
from megagrow.growth.operators import GrowthSpec, grown_config
from megagrow.growth.rank_growth import RankGrowth
from megagrow.parallel import state
from megagrow.parallel.pipeline import partition_layers
from megagrow.training import checkpoint_state
from megagrow.checkpoint.layout import read_tracker
from megagrow.training.metrics import peak_memory_gb
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
    common = {"train_tokens": None, "lr_decay_iters": train.lr_decay_iters or total, "run_iters": total,
              "grow_at_tokens": None}
    base = dataclasses.replace(train, train_iters=grow_at, **common)
    split = train.pipeline_layer_split
    grown_dir = str(Path(train.save) / GROWN_SUBDIR)
    grown = dataclasses.replace(train, train_iters=total, load=grown_dir, save=grown_dir,
                                pipeline_layer_split=[count * spec.factor for count in split] if split else None,
                                **common)
    return base, grown_config(model, spec), grown


def train_with_growth(model: ModelConfig, parallel, train: TrainConfig, data) -> Trainer:
    """Train the base model to --grow-at-tokens, grow it, and train the grown model to the end; returns the last Trainer."""
    base_train, grown_model, grown_train = phase_configs(model, train)
    start = None
    if read_tracker(grown_train.load) is None:
        base = Trainer(model, parallel, base_train, data)
        base.run()
        if base.progress.iteration < base_train.train_iters:  # stopped by a signal: resume later
            return base
        spec = growth_spec(train)
        logger.info("growing at iteration %d by %s x%d on every rank (%s)", base_train.train_iters, spec.operator,
                    spec.factor, "stacked Adam state" if train.stack_optimizer_state else "fresh optimizer")
        base_model = base.model_config
        del base  # the base stage and its optimizer (a DeepSpeed engine too) go before the grown one is built
        gc.collect()
        base_stages = partition_layers(model.num_layers, parallel.pp, base_train.pipeline_layer_split)
        grown_stages = partition_layers(grown_model.num_layers, parallel.pp, grown_train.pipeline_layer_split)
        start = RankGrowth(train.save, base_train.train_iters, spec, base_model, grown_model.replace(
            params_dtype=base_model.params_dtype), base_stages, grown_stages[state.pp_rank()],
            train.stack_optimizer_state)
    grow_started = time.perf_counter()
    grown = Trainer(grown_model, parallel, grown_train, data, start=start)
    if start is not None:
        built = time.perf_counter()
        checkpoint_state.save(grown)  # the grown model at the growth point, where a relaunch resumes
        del start
        logger.info("grown stage built in %.1f s and saved in %.1f s; peak memory of this rank so far %.2f GB",
                    built - grow_started, time.perf_counter() - built, peak_memory_gb())
    grown.run()
    return grown
