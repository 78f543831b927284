"""Write a model given as full tensor groups into a checkpoint of any (tp, pp) layout, torch or torch_dist.

`save_sharded` takes any group reader (a checkpoint's `CheckpointReader.read_group`, an HF
directory, a grown model, a full state dict) and writes an iteration Megatron-LM and
pretrain_gpt.py `--load` accept as the start of a new run: the model, Megatron's `args`
and megagrow's config record, no optimizer state, progress or RNG.

    torch       one model_optim_rng.pt per (tp, pp) rank, layers numbered per stage
    torch_dist  one __R_0.distcp per (tp, pp) rank holding its chunks, then .metadata,
                common.pt and metadata.json (megagrow/checkpoint/torch_dist.py)

Given a `describe_group` (shapes and dtypes as meta tensors, e.g. `CheckpointReader.describe_group`)
a torch-format shard file is streamed group by group (streaming_writer.py); torch_dist
files are always written chunk by chunk. Either way nothing is held whole: the peak is a few
copies of the largest group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from megagrow.checkpoint import names, torch_dist
from megagrow.checkpoint.layout import (
    SHARD_FILENAME,
    TORCH,
    TORCH_DIST,
    Iteration,
    iteration_number,
    save_iteration,
    shard_dir_name,
)
from megagrow.checkpoint.megatron_args import MEGATRON_CHECKPOINT_VERSION, build_args, config_record
from megagrow.checkpoint.megatron_state import MEGAGROW_FORMAT_VERSION, MEGAGROW_KEY, shard_file, with_extra_states
from megagrow.checkpoint.reader import EMBEDDING_GROUP, HEAD_GROUP, Group, GroupReader, group_param_names
from megagrow.checkpoint.streaming_writer import Fill, ShardStream, write_streamed
from megagrow.checkpoint.tp_layout import split_for_tp
from megagrow.config import ModelConfig, ParallelConfig, validate_parallel
from megagrow.errors import UserError
from megagrow.parallel.pipeline import partition_layers


def reader_from_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> GroupReader:
    """A GroupReader over a full state dict already in memory."""
    def read_group(group: Group) -> dict[str, torch.Tensor]:
        wanted = group_param_names(group, config)
        missing = [name for name in wanted if name not in state]
        if missing:
            raise UserError(f"the state dict lacks {missing[:3]}; it does not match the model config")
        return {name: state[name] for name in wanted}

    return read_group


def _split_group(config: ModelConfig, full: dict[str, torch.Tensor], tp: int, tp_rank: int, layer_offset: int,
                 rename: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    shards = {}  # `full` is consumed
    for name in list(full):
        # Popped, so each full tensor is freed as soon as split_for_tp has padded or cut it.
        local = names.renumber_layers({(rename or {}).get(name, name): None}, -layer_offset).popitem()[0]
        shards[local] = split_for_tp(name, full.pop(name), config, tp)[tp_rank]
    return shards


def stage_groups(config: ModelConfig, read_group: GroupReader, layers: range, *, tp: int, tp_rank: int,
                 first: bool, last: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This (tp_rank, stage)'s part of the model, one group at a time, in order, layers numbered from the stage's first."""
    groups: list[Group] = ([EMBEDDING_GROUP] if first else []) + list(layers) + ([HEAD_GROUP] if last else [])
    for group in groups:
        # Nothing of a group stays referenced here once it is yielded, so it is freed when written.
        yield _split_group(config, dict(read_group(group)), tp, tp_rank, layers.start)  # a copy: readers keep theirs
    if config.tie_embeddings and last and not first:
        # The last stage keeps its own copy of the tied embedding as the output head.
        yield _split_group(config, {names.EMBEDDING: read_group(EMBEDDING_GROUP)[names.EMBEDDING]}, tp, tp_rank,
                           layers.start, rename={names.EMBEDDING: names.OUTPUT_LAYER})


def stage_shard(config: ModelConfig, read_group: GroupReader, layers: range, *, tp: int, tp_rank: int,
                first: bool, last: bool) -> dict[str, torch.Tensor]:
    """This (tp_rank, stage)'s part of the model read through `read_group`, whole: embedding, layers, head as owned."""
    return {name: tensor for part in stage_groups(config, read_group, layers, tp=tp, tp_rank=tp_rank, first=first,
                                                  last=last)
            for name, tensor in part.items()}


def as_meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors as meta tensors: shapes and dtypes only."""
    return {name: tensor.to("meta") for name, tensor in tensors.items()}


def model_fills(parts: Iterator[dict[str, torch.Tensor]]) -> Iterator[Fill]:
    """stage_groups' groups as streaming-writer fills of the shard's `model` entry."""
    for part in parts:
        yield {("model", name): tensor for name, tensor in part.items()}
        del part  # keep nothing of a written group while the next one is read


def model_only_file(config: ModelConfig, model: dict[str, torch.Tensor], *, iteration: Iteration, tp: int, pp: int,
                    num_layers: int, has_output_layer: bool, extra: dict | None = None) -> dict:
    """A shard file holding a model only (plus `extra` megagrow entries), which training loads as a new run's start."""
    args = build_args(config, ParallelConfig(tp=tp, pp=pp), ckpt_format=TORCH)
    megagrow = {"config": config_record(config, ParallelConfig(tp=tp, pp=pp), None), **(extra or {})}
    return shard_file(with_extra_states(model, num_layers, has_output_layer), args=args,
                      iteration=iteration_number(iteration), megagrow=megagrow)


def common_state(config: ModelConfig, *, iteration: Iteration, tp: int, pp: int, extra: dict | None = None) -> dict:
    """torch_dist common.pt of a model-only checkpoint."""
    return {"args": build_args(config, ParallelConfig(tp=tp, pp=pp), ckpt_format=TORCH_DIST),
            "checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "iteration": iteration_number(iteration),
            MEGAGROW_KEY: {"format_version": MEGAGROW_FORMAT_VERSION,
                           "config": config_record(config, ParallelConfig(tp=tp, pp=pp), None), **(extra or {})}}


def write_torch_shards(root: Path, iteration: Iteration, pp: int, tp: int, shard: Callable[[int, int], ShardStream],
                       on_written: Callable[[], None] = lambda: None) -> Path:
    """Write every (tp_rank, pp_rank) file of a torch-format iteration from one process, atomically."""
    def write(tmp_dir: Path, _own_copy: bool) -> None:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                path = tmp_dir / shard_dir_name(tp_rank, pp_rank, pp) / SHARD_FILENAME
                path.parent.mkdir(parents=True, exist_ok=True)
                write_streamed(path, shard(tp_rank, pp_rank))  # built lazily: one shard alive at a time
                on_written()

    return save_iteration(root, iteration, write, barrier=lambda: None, is_coordinator=lambda: True)


def write_torch_dist(root: Path, iteration: Iteration, config: ModelConfig, stages: list[range], tp: int,
                     parts: Callable[[int, int], Iterator[dict[str, torch.Tensor]]], common: dict,
                     on_written: Callable[[], None] = lambda: None) -> Path:
    """Write a torch_dist iteration from one process: one chunk file per (tp, pp) rank, then the metadata."""
    def chunks(tp_rank: int, pp_rank: int) -> Iterator[torch_dist.TensorChunk | torch_dist.ObjectEntry]:
        last_but_not_first = pp_rank == len(stages) - 1 and pp_rank > 0
        return torch_dist.stage_entries(parts(tp_rank, pp_rank), tp_rank=tp_rank, tp=tp, layers=stages[pp_rank],
                                        num_layers=config.num_layers,
                                        tied_head_copy=last_but_not_first and config.tie_embeddings)

    def write(tmp_dir: Path, _own_copy: bool) -> None:
        records = []
        for pp_rank in range(len(stages)):
            for tp_rank in range(tp):
                records += torch_dist.write_rank_file(tmp_dir, pp_rank * tp + tp_rank, chunks(tp_rank, pp_rank))
                on_written()
        torch_dist.write_metadata(tmp_dir, records, common)

    return save_iteration(root, iteration, write, barrier=lambda: None, is_coordinator=lambda: True)


def save_sharded(root: str | os.PathLike, iteration: Iteration, config: ModelConfig, read_group: GroupReader, *,
                 tp: int, pp: int, layers_per_stage: Sequence[int] | None = None, progress: bool = True,
                 describe_group: GroupReader | None = None, ckpt_format: str = TORCH) -> Path:
    """Write the model of `read_group` as a (tp, pp) checkpoint iteration under `root`, atomically.

    torch: with `describe_group` (read_group's shapes and dtypes as meta tensors) each shard
    file is streamed group by group; without it each shard is built whole before it is written.
    """
    validate_parallel(config, ParallelConfig(tp=tp, pp=pp))
    stages = partition_layers(config.num_layers, pp, layers_per_stage, "--target-pipeline-parallel-size")
    bar = tqdm(total=tp * pp, desc=f"writing tp={tp} pp={pp} {ckpt_format} shards", unit="shard",
               disable=None if progress else True)

    def where(tp_rank: int, pp_rank: int) -> dict:
        return {"tp": tp, "tp_rank": tp_rank, "first": pp_rank == 0, "last": pp_rank == pp - 1}

    def shard(tp_rank: int, pp_rank: int) -> ShardStream:
        layers = stages[pp_rank]
        file_for = dict(iteration=iteration, tp=tp, pp=pp, num_layers=len(layers), has_output_layer=pp_rank == pp - 1)
        if describe_group is None:
            model = stage_shard(config, read_group, layers, **where(tp_rank, pp_rank))
            return ShardStream(model_only_file(config, model, **file_for))
        model = as_meta(stage_shard(config, describe_group, layers, **where(tp_rank, pp_rank)))
        fills = model_fills(stage_groups(config, read_group, layers, **where(tp_rank, pp_rank)))
        return ShardStream(model_only_file(config, model, **file_for), fills)

    try:
        if ckpt_format == TORCH_DIST:
            return write_torch_dist(Path(root), iteration, config, stages, tp,
                                    lambda t, p: stage_groups(config, read_group, stages[p], **where(t, p)),
                                    common_state(config, iteration=iteration, tp=tp, pp=pp), on_written=bar.update)
        return write_torch_shards(Path(root), iteration, pp, tp, shard, on_written=bar.update)
    finally:
        bar.close()
