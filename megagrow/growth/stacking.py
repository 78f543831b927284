"""Depth growth of a sharded checkpoint: a base checkpoint of any (tp, pp) layout becomes the
checkpoint of the grown model in any layout, one layer at a time.

    base checkpoint ──CheckpointReader──> full base layer S ──grow_layer──> full grown layer T
                                                                  │
                         grown checkpoint <──save layout── split for the target tp rank

Grown layer T reads base layer `layer_sources(spec, L)[T]` (for G_stack: T mod L) wherever
that layer was saved, so a target pipeline stage receives its layers from any source stage.
Each grown layer is made by `megagrow.growth.depth.grow_layer`, the function `grow()` applies
to full state dicts, so the written model is exactly `grow(base state dict)` resharded.

Memory: nothing is held whole. Base layers are memory-mapped and merged one at a time; each
target shard file is streamed (megagrow/checkpoint/streaming_writer.py): its skeleton is
written from shapes and dtypes alone (the base read as meta tensors), then each grown layer
is made, written into it and freed before the next. The peak is the imports plus a few
copies of the largest group (a layer, or the embedding) in flight: merged, grown, tp-split.
Stacked Adam moments and masters are model-space tensors shaped like the weights
(megagrow/checkpoint/optimizer_layout.py), so they stream the same way, one group of one
kind at a time, whichever optimizer layout saved the base. What cannot be described from the
base's metadata is computed twice, once for the skeleton's shapes and once to write: the new
layers of depth:zero / depth:random. Measured peaks are in benchmarks/RESULTS.md.

The shards hold the grown model, its config and a `growth` record (operator, factor, source
path and iteration). Without run state pretrain_gpt.py --load starts a new run from them;
with it (`RunStateOptions`) they also carry the base run's progress, LR schedule position and
RNG, and an optimizer state (fresh, or the base's Adam moments stacked like the weights), so
training resumes where the base run stopped, with the grown model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from megagrow.checkpoint.layout import TORCH, TORCH_DIST, read_tracker
from megagrow.checkpoint.megatron_args import build_args
from megagrow.checkpoint.megatron_state import MEGAGROW_KEY, shard_file, with_extra_states
from megagrow.checkpoint.reader import CheckpointReader, Group, GroupReader
from megagrow.checkpoint.reshard import (
    as_meta,
    common_state,
    model_fills,
    model_only_file,
    stage_groups,
    stage_shard,
    write_torch_dist,
    write_torch_shards,
)
from megagrow.checkpoint.streaming_writer import Fill, ShardStream
from megagrow.config import ModelConfig, ParallelConfig, validate_parallel
from megagrow.errors import UserError
from megagrow.growth.depth import grow_layer
from megagrow.growth.operators import DEPTH, GrowthSpec, grown_config, layer_sources
from megagrow.checkpoint.optimizer_layout import MASTER, param_state, stage_record
from megagrow.growth.run_state import RunStateOptions, RunStateWriter
from megagrow.growth.tensors import LAYER_TENSORS, layer_tensor_name
from megagrow.parallel.pipeline import partition_layers


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
        "source_format": f"{reader.origin} {reader.format}",
        "source_num_layers": reader.config.num_layers,
        "source_parallel": {"tp": reader.tp, "pp": reader.pp},
    }


OPTIMIZER_PATH = (MEGAGROW_KEY, "optimizer")  # where a shard file keeps its optimizer record


def stacked_optimizer(model: dict[str, torch.Tensor], writer: RunStateWriter) -> dict:
    """A grown stage's optimizer record with meta tensors standing for the stacked moments (and masters)."""
    kinds = writer.state_kinds()
    params = {name: param_state(*(torch.empty(t.shape, dtype=torch.float32, device="meta") for t in (weight, weight)),
                                torch.empty(weight.shape, dtype=torch.float32, device="meta") if MASTER in kinds else None,
                                writer.optimizer_steps)
              for name, weight in model.items()}
    loss_scaler = (writer.reader.common.get(MEGAGROW_KEY, {}).get("optimizer") or {}).get("loss_scaler")
    return stage_record(params, loss_scaler)


def stacked_optimizer_fills(grown: ModelConfig, spec: GrowthSpec, writer: RunStateWriter, layers: range,
                            where: dict) -> Iterator[Fill]:
    """The stacked optimizer tensors of one grown stage, one group of one kind at a time (G_stack of each kind)."""
    base = writer.reader.config
    for kind in writer.state_kinds():
        read_grown = grown_layer_reader(writer.base_state_reader(kind), base, spec)
        for part in stage_groups(grown, read_grown, layers, **where):
            yield {(*OPTIMIZER_PATH, "params", name, kind): tensor.float() for name, tensor in part.items()}
            del part


def check_target(grown: ModelConfig, tp: int, pp: int, layers_per_stage: Sequence[int] | None) -> list[range]:
    """Layer ranges of the target stages; refuses a layout the grown model cannot be split into."""
    try:
        validate_parallel(grown, ParallelConfig(tp=tp, pp=pp))
        return partition_layers(grown.num_layers, pp, layers_per_stage, "--target-pipeline-parallel-size")
    except UserError as err:
        raise UserError(f"target layout tp={tp} pp={pp} does not fit the grown model ({grown.num_layers} layers): "
                        f"{err}") from None


def _refuse_existing(save: Path, load: Path) -> None:
    if save.resolve() == load.resolve():
        raise UserError(f"--save {save} is the --load directory; write the grown checkpoint to a new directory")
    if read_tracker(save) is not None:
        raise UserError(f"--save {save} already holds a checkpoint; choose a new directory")


def _grown_file(grown: ModelConfig, model: dict[str, torch.Tensor], *, tp: int, pp: int, layers: range, last: bool,
                record: dict, iteration, run: dict | None) -> dict:
    """The shard file of one grown stage: model-only, or carrying the base run's state."""
    if run is None:
        return model_only_file(grown, model, iteration=iteration, tp=tp, pp=pp, num_layers=len(layers),
                               has_output_layer=last, extra={"growth": record})
    progress = run["progress"]
    args = build_args(grown, ParallelConfig(tp=tp, pp=pp), ckpt_format=TORCH,
                      consumed_train_samples=progress["consumed_samples"])
    megagrow = {"config": {"model": asdict(grown), "parallel": asdict(ParallelConfig(tp=tp, pp=pp))},
                "growth": record, "progress": progress, "scheduler": run["scheduler"], "optimizer": run["optimizer"]}
    return shard_file(with_extra_states(model, len(layers), last), args=args, iteration=progress["iteration"],
                      megagrow=megagrow, rng=run["rng"], scheduler=run["opt_param_scheduler"],
                      flops_so_far=float(progress.get("consumed_flops", 0.0)))


def stack_checkpoint(load: str | os.PathLike, save: str | os.PathLike, spec: GrowthSpec, *,
                     iteration=None, tp: int | None = None, pp: int | None = None,
                     layers_per_stage: Sequence[int] | None = None, run_state: RunStateOptions | None = None,
                     progress: bool = True, ckpt_format: str = TORCH, vocab_size: int | None = None) -> Path:
    """Grow the checkpoint under `load` in depth by `spec` and write it under `save` (default: the source layout).

    `vocab_size` gives the vocabulary where the checkpoint records only its padded size (Megatron-LM's args).
    """
    load, save = Path(load), Path(save)
    if spec.growth_operator.dimension != DEPTH:
        raise UserError(f"{spec.operator}: sharded growth streams depth operators only; grow width on a full "
                        f"state dict with megagrow.growth.grow")
    if ckpt_format == TORCH_DIST and run_state is not None:
        raise UserError("--carry-run-state/--stack-optimizer-state write the torch format (per-rank files carry the "
                        "optimizer state); drop --ckpt-format torch_dist, or grow the model only")
    _refuse_existing(save, load)
    reader = CheckpointReader(load, iteration, vocab_size=vocab_size)
    grown = grown_config(reader.config, spec)
    tp, pp = tp or reader.tp, pp or reader.pp
    stages = check_target(grown, tp, pp, layers_per_stage)
    state_writer = RunStateWriter(reader, spec, run_state) if run_state is not None else None
    read_grown = grown_layer_reader(reader.read_group, reader.config, spec)
    describe_grown = grown_layer_reader(reader.describe_group, reader.config, spec)
    record = growth_record(spec, reader)
    bar = tqdm(total=tp * pp, desc=f"stacking x{spec.factor} into tp={tp} pp={pp}", unit="shard",
               disable=None if progress else True)

    def where(tp_rank: int, pp_rank: int) -> dict:
        return {"tp": tp, "tp_rank": tp_rank, "first": pp_rank == 0, "last": pp_rank == pp - 1}

    def shard(tp_rank: int, pp_rank: int) -> ShardStream:
        layers = stages[pp_rank]
        model = as_meta(stage_shard(grown, describe_grown, layers, **where(tp_rank, pp_rank)))
        fills = model_fills(stage_groups(grown, read_grown, layers, **where(tp_rank, pp_rank)))
        run = None
        if state_writer is not None:
            optimizer = stacked_optimizer(model, state_writer) if state_writer.stacks_moments else None
            run = {**state_writer.records(), "optimizer": optimizer}
        file = _grown_file(grown, model, tp=tp, pp=pp, layers=layers, last=pp_rank == pp - 1, record=record,
                           iteration=reader.iteration, run=run)
        if state_writer is not None and state_writer.stacks_moments:
            fills = itertools.chain(fills, stacked_optimizer_fills(grown, spec, state_writer, layers,
                                                                   where(tp_rank, pp_rank)))
        return ShardStream(file, fills)

    try:
        if ckpt_format == TORCH_DIST:
            common = common_state(grown, iteration=reader.iteration, tp=tp, pp=pp, extra={"growth": record})
            return write_torch_dist(save, reader.iteration, grown, stages, tp,
                                    lambda t, p: stage_groups(grown, read_grown, stages[p], **where(t, p)), common,
                                    on_written=bar.update)
        return write_torch_shards(save, reader.iteration, pp, tp, shard, on_written=bar.update)
    finally:
        bar.close()
