"""Depth growth of a sharded checkpoint: a base checkpoint of any (tp, pp) layout becomes the
checkpoint of the grown model in any layout, one layer at a time.

    base checkpoint ──CheckpointReader──> full base layer S ──grow_layer──> full grown layer T
                                                                  │
                         grown checkpoint <──save layout── split for the target tp rank

Grown layer T reads base layer `layer_sources(spec, L)[T]` (for G_stack: T mod L) wherever
that layer was saved, so a target pipeline stage receives its layers from any source stage.
Each grown layer is made by `megagrow.growth.depth.grow_layer`, the function `grow()` applies
to full state dicts, so the written model is exactly `grow(base state dict)` resharded.

Memory: the base shards are memory-mapped and merged one layer at a time, so the base model
is never held; a target shard (the grown model / (tp * pp)) is built whole, as torch.save
writes one file per shard. Measured peaks are in benchmarks/RESULTS.md.

The shards hold the grown model, its config and a `growth` record (operator, factor, source
path and iteration). Without run state pretrain_gpt.py --load starts a new run from them;
with it (`RunStateOptions`) they also carry the base run's progress, LR schedule position and
RNG, and an optimizer state (fresh, or the base's Adam moments stacked like the weights), so
training resumes where the base run stopped, with the grown model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from megagrow.checkpoint.reshard import (
    CheckpointReader,
    Group,
    GroupReader,
    shard_record,
    stage_shard,
    write_all_shards,
)
from megagrow.config import ModelConfig, ParallelConfig, validate_parallel
from megagrow.errors import UserError
from megagrow.growth.depth import grow_layer
from megagrow.growth.operators import DEPTH, GrowthSpec, grown_config, layer_sources
from megagrow.growth.run_state import RunStateOptions, RunStateWriter
from megagrow.growth.tensors import LAYER_TENSORS, layer_tensor_name
from megagrow.parallel.pipeline import partition_layers
from megagrow.training.checkpointing import read_tracker


def grown_layer_reader(read_base: GroupReader, base: ModelConfig, spec: GrowthSpec) -> GroupReader:
    """A GroupReader of the depth-grown model, reading the base model's groups on demand."""
    grown = grown_config(base, spec)
    sources = layer_sources(spec, base.num_layers)
    fill = spec.growth_operator.fill

    def read_group(group: Group) -> dict[str, torch.Tensor]:
        if not isinstance(group, int):  # embedding, final norm and head are copied
            return read_base(group)
        source = sources[group]
        source_tensors = None
        if source is not None:
            base_tensors = read_base(source)
            source_tensors = {name: base_tensors[layer_tensor_name(source, name)] for name in LAYER_TENSORS}
        layer = grow_layer(source_tensors, group, grown, fill, spec.seed, base.torch_dtype)
        return {layer_tensor_name(group, name): tensor for name, tensor in layer.items()}

    return read_group


def growth_record(spec: GrowthSpec, reader: CheckpointReader) -> dict:
    """What the `growth` entry of a grown shard says: how it was grown, and from what."""
    return {
        "operator": spec.operator,
        "paper_name": spec.growth_operator.paper_name,
        "factor": spec.factor,
        "layout": spec.depth_layout,
        "seed": spec.seed,
        "source": str(reader.root.resolve()),
        "source_iteration": reader.iteration,
        "source_num_layers": reader.config.num_layers,
        "source_parallel": {"tp": reader.tp, "pp": reader.pp},
    }


def check_target(grown: ModelConfig, tp: int, pp: int, layers_per_stage: Sequence[int] | None) -> list[range]:
    """Layer ranges of the target stages; refuses a layout the grown model cannot be split into."""
    try:
        validate_parallel(grown, ParallelConfig(tp=tp, pp=pp))
        return partition_layers(grown.num_layers, pp, layers_per_stage)
    except UserError as err:
        raise UserError(f"target layout tp={tp} pp={pp} does not fit the grown model ({grown.num_layers} layers): "
                        f"{err}") from None


def _refuse_existing(save: Path, load: Path) -> None:
    if save.resolve() == load.resolve():
        raise UserError(f"--save {save} is the --load directory; write the grown checkpoint to a new directory")
    if read_tracker(save) is not None:
        raise UserError(f"--save {save} already holds a checkpoint; choose a new directory")


def stack_checkpoint(load: str | os.PathLike, save: str | os.PathLike, spec: GrowthSpec, *,
                     iteration: int | None = None, tp: int | None = None, pp: int | None = None,
                     layers_per_stage: Sequence[int] | None = None, run_state: RunStateOptions | None = None,
                     progress: bool = True) -> Path:
    """Grow the checkpoint under `load` in depth by `spec` and write it under `save` (default: the source layout)."""
    load, save = Path(load), Path(save)
    if spec.growth_operator.dimension != DEPTH:
        raise UserError(f"{spec.operator}: sharded growth streams depth operators only; grow width on a full "
                        f"state dict with megagrow.growth.grow")
    _refuse_existing(save, load)
    reader = CheckpointReader(load, iteration)
    grown = grown_config(reader.config, spec)
    tp, pp = tp or reader.tp, pp or reader.pp
    stages = check_target(grown, tp, pp, layers_per_stage)
    state_writer = RunStateWriter(reader, spec, grown, tp, run_state) if run_state is not None else None
    read_grown = grown_layer_reader(reader.read_group, reader.config, spec)
    record = growth_record(spec, reader)
    bar = tqdm(total=tp * pp, desc=f"stacking x{spec.factor} into tp={tp} pp={pp}", unit="shard",
               disable=not progress)

    def shards() -> Iterator[tuple[int, int, dict]]:
        for pp_rank, layers in enumerate(stages):
            for tp_rank in range(tp):
                model = stage_shard(grown, read_grown, layers, tp=tp, tp_rank=tp_rank, first=pp_rank == 0,
                                     last=pp_rank == pp - 1)
                shard = {**shard_record(grown, model, tp, pp), "growth": record}
                if state_writer is not None:
                    shard.update(state_writer.shard_state(model, tp_rank))
                yield tp_rank, pp_rank, shard
                bar.update()

    try:
        return write_all_shards(save, reader.iteration, shards(), pp)
    finally:
        bar.close()

