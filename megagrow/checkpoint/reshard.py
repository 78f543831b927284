"""Read a megagrow checkpoint of any (tp, pp) layout as full tensors, and write full tensors into any layout.

Full tensors are grouped so that tools can stream a model instead of holding it whole:

    "embedding"   embedding.weight
    0 .. L-1      the six parameters of layer N (`layers.N.…`)
    "head"        final_norm.weight, and output_layer.weight unless the embeddings are tied

`CheckpointReader.read_group` merges one group from the tp shards of the stage holding it.
The shard files are memory-mapped, and mapped afresh for each read, so reading layer by layer
keeps resident memory near one layer. `save_sharded` takes any such group reader (a
checkpoint, an HF directory, a grown model) and writes a checkpoint in megagrow's layout that
pretrain_gpt.py `--load` accepts as the start of a new run (model + config only: no
optimizer state, progress or RNG). Given a `describe_group` (shapes and dtypes as meta
tensors, e.g. `CheckpointReader.describe_group`) it streams each shard file group by group
(megagrow/checkpoint/streaming_writer.py); without one it builds each shard whole.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from megagrow.checkpoint.streaming_writer import Fill, ShardStream, write_streamed
from megagrow.checkpoint.tp_layout import (
    LAYER_PARAM_SUFFIXES,
    full_shape,
    layer_param_name,
    merge_from_tp,
    parse_layer_param,
    split_for_tp,
)
from megagrow.config import ModelConfig, ParallelConfig, validate_parallel
from megagrow.errors import UserError
from megagrow.parallel.pipeline import partition_layers
from megagrow.training.checkpoint_state import CHECKPOINT_VERSION
from megagrow.training.checkpointing import (
    SHARD_FILENAME,
    checkpoint_layout,
    iteration_dir,
    read_tracker,
    save_checkpoint,
    shard_dir_name,
    shard_path,
)

EMBEDDING_GROUP = "embedding"
HEAD_GROUP = "head"
Group = int | str
# group -> {full parameter name: full tensor}
GroupReader = Callable[[Group], dict[str, torch.Tensor]]


def group_keys(config: ModelConfig) -> list[Group]:
    """Every group of a model, in the order of the forward pass."""
    return [EMBEDDING_GROUP, *range(config.num_layers), HEAD_GROUP]


def group_param_names(group: Group, config: ModelConfig) -> list[str]:
    """Full parameter names in one group."""
    if group == EMBEDDING_GROUP:
        return ["embedding.weight"]
    if group == HEAD_GROUP:
        return ["final_norm.weight"] + ([] if config.tie_embeddings else ["output_layer.weight"])
    return [layer_param_name(group, suffix) for suffix in LAYER_PARAM_SUFFIXES]


def model_config_from_record(record: dict, where: str) -> ModelConfig:
    """The ModelConfig stored in a shard's `config` record."""
    model = record.get("config", {}).get("model") if isinstance(record.get("config"), dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{where}: the shard has no config record; it was not written by megagrow")
    try:
        return ModelConfig(**model)
    except TypeError as err:
        raise UserError(f"{where}: the config record does not describe a megagrow model ({err})") from None


def _load_mapped(path: Path) -> dict:
    # Memory-mapped: tensors are paged in when a group reads them, not when the file opens.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle/zip errors: the file is damaged or not ours
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be loaded safely ({first_line}); the checkpoint is corrupt or holds code") \
            from None


class CheckpointReader:
    """One saved iteration of a megagrow checkpoint, of any (tp, pp) layout, read as full tensors."""

    def __init__(self, root: str | os.PathLike, iteration: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"checkpoint directory not found: {self.root} (check --load)")
        if iteration is None:
            iteration = read_tracker(self.root)
            if iteration is None:
                raise UserError(f"no checkpoint in {self.root}: latest_checkpointed_iteration.txt is missing "
                                f"(check --load, or pass --iteration)")
        self.iteration = iteration
        self.tp, self.pp = checkpoint_layout(self.root, iteration)
        self._shards = {(t, p): _load_mapped(shard_path(self.root, iteration, t, p, self.pp))
                        for p in range(self.pp) for t in range(self.tp)}
        self.config = model_config_from_record(self._shards[0, 0], self._where(0, 0))
        self._check_recorded_layout()
        for (t, p), shard in self._shards.items():
            if model_config_from_record(shard, self._where(t, p)) != self.config:
                raise UserError(f"{self._where(t, p)}: its model config differs from {shard_dir_name(0, 0, self.pp)}'s; "
                                f"the shards come from different runs")
        self._stage_of_layer = self._find_layer_stages()

    def _check_recorded_layout(self) -> None:
        # checkpoint_layout infers the sizes from the highest ranks present, so a missing last
        # rank would pass for a smaller layout; the record says what was saved.
        recorded = self._shards[0, 0]["config"].get("parallel", {})
        saved = (recorded.get("tp", self.tp), recorded.get("pp", self.pp))
        if saved != (self.tp, self.pp):
            raise UserError(f"{iteration_dir(self.root, self.iteration)}: shards missing for the tp={saved[0]} "
                            f"pp={saved[1]} layout it was saved with (found tp={self.tp} pp={self.pp}); "
                            f"the checkpoint is incomplete")

    def _where(self, tp_rank: int, pp_rank: int) -> str:
        return str(shard_path(self.root, self.iteration, tp_rank, pp_rank, self.pp).parent)

    def _find_layer_stages(self) -> dict[int, int]:
        stage_of_layer: dict[int, int] = {}
        for p in range(self.pp):
            for name in self._shards[0, p]["model"]:
                parsed = parse_layer_param(name)
                if parsed is not None:
                    stage_of_layer.setdefault(parsed[0], p)
        expected = set(range(self.config.num_layers))
        if set(stage_of_layer) != expected:
            missing = sorted(expected - set(stage_of_layer))[:4]
            raise UserError(f"{self.root}: iteration {self.iteration} holds layers {sorted(stage_of_layer)[:8]}..., "
                            f"missing {missing} of the config's {self.config.num_layers}; the checkpoint is incomplete")
        return stage_of_layer

    @property
    def layers_per_stage(self) -> list[int]:
        """Layers held by each pipeline stage of this checkpoint."""
        counts = [0] * self.pp
        for stage in self._stage_of_layer.values():
            counts[stage] += 1
        return counts

    def _stage_of(self, group: Group) -> int:
        if group == EMBEDDING_GROUP:
            return 0
        if group == HEAD_GROUP:
            return self.pp - 1
        return self._stage_of_layer[group]

    def _group_shards(self, group: Group, models: list[dict]) -> dict[str, list[torch.Tensor]]:
        stage = self._stage_of(group)
        shards = {}
        for name in group_param_names(group, self.config):
            for t, model in enumerate(models):
                if name not in model:
                    raise UserError(f"{self._where(t, stage)}: tensor {name} is missing; the checkpoint is incomplete "
                                    f"or was saved by another model")
            shards[name] = [model[name] for model in models]
        return shards

    def read_group(self, group: Group) -> dict[str, torch.Tensor]:
        """Full (unsharded, unpadded) tensors of one group."""
        stage = self._stage_of(group)
        # Mapped afresh and dropped after the merge (which copies), so the pages read leave this
        # process's resident set with the group instead of accumulating to the whole base model.
        models = [_load_mapped(shard_path(self.root, self.iteration, t, stage, self.pp))["model"]
                  for t in range(self.tp)]
        return {name: merge_from_tp(name, shards, self.config) for name, shards in self._group_shards(group, models).items()}

    def describe_group(self, group: Group) -> dict[str, torch.Tensor]:
        """read_group's result as meta tensors (full shapes, saved dtypes), reading no tensor data."""
        models = [self._shards[t, self._stage_of(group)]["model"] for t in range(self.tp)]
        return {name: torch.empty(full_shape(name, self.config), dtype=shards[0].dtype, device="meta")
                for name, shards in self._group_shards(group, models).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole full state dict (holds the model in memory; prefer read_group for large models)."""
        return {name: tensor for group in group_keys(self.config) for name, tensor in self.read_group(group).items()}


def reader_from_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> GroupReader:
    """A GroupReader over a full state dict already in memory."""
    def read_group(group: Group) -> dict[str, torch.Tensor]:
        names = group_param_names(group, config)
        missing = [name for name in names if name not in state]
        if missing:
            raise UserError(f"the state dict lacks {missing[:3]}; it does not match the model config")
        return {name: state[name] for name in names}

    return read_group


def _split_group(config: ModelConfig, full: dict[str, torch.Tensor], tp: int, tp_rank: int,
                 rename: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    shards = {}  # `full` is consumed
    for name in list(full):
        # Popped, so each full tensor is freed as soon as split_for_tp has padded or cut it.
        shards[(rename or {}).get(name, name)] = split_for_tp(name, full.pop(name), config, tp)[tp_rank]
    return shards


def stage_groups(config: ModelConfig, read_group: GroupReader, layers: range, *, tp: int, tp_rank: int,
                 first: bool, last: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This (tp_rank, stage)'s part of the model read through `read_group`, one group at a time, in order."""
    groups: list[Group] = ([EMBEDDING_GROUP] if first else []) + list(layers) + ([HEAD_GROUP] if last else [])
    for group in groups:
        # Nothing of a group stays referenced here once it is yielded, so it is freed when written.
        yield _split_group(config, dict(read_group(group)), tp, tp_rank)  # a copy: readers may keep theirs
    if config.tie_embeddings and last and not first:
        # The last stage keeps its own copy of the tied embedding as the output head.
        yield _split_group(config, {"embedding.weight": read_group(EMBEDDING_GROUP)["embedding.weight"]}, tp, tp_rank,
                           rename={"embedding.weight": "output_layer.weight"})


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


def shard_record(config: ModelConfig, model: dict[str, torch.Tensor], tp: int, pp: int) -> dict:
    """A shard file holding a model only, which training loads as the start of a new run."""
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "model": model,
        "config": {"model": asdict(config), "parallel": asdict(ParallelConfig(tp=tp, pp=pp))},
    }


def write_all_shards(root: Path, iteration: int, shards: Iterator[tuple[int, int, ShardStream]], pp: int) -> Path:
    """Write every (tp_rank, pp_rank, shard) of one iteration from a single process, atomically."""
    # save_checkpoint is collective: the coordinator creates iter_N.tmp/, every rank writes its
    # shard there after the first barrier, the coordinator fsyncs, renames it into place and only
    # then updates the tracker. One process plays every rank: as coordinator it passes no state,
    # and at the first barrier it streams each shard file into the temporary directory in turn,
    # so a shard that fails half-written is never renamed into place nor named by the tracker.
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    at_first_barrier = True

    def barrier() -> None:
        nonlocal at_first_barrier
        if not at_first_barrier:
            return
        at_first_barrier = False
        if not tmp_dir.is_dir():  # guards the naming convention shared with save_checkpoint
            raise RuntimeError(f"save_checkpoint did not create {tmp_dir}; update write_all_shards to its layout")
        for tp_rank, pp_rank, shard in shards:
            path = tmp_dir / shard_dir_name(tp_rank, pp_rank, pp) / SHARD_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            write_streamed(path, shard)
            del shard  # a shard built whole must not stay resident while the next one is built

    return save_checkpoint(root, iteration, None, pp_size=pp, barrier=barrier, is_coordinator=lambda: True)


def save_sharded(root: str | os.PathLike, iteration: int, config: ModelConfig, read_group: GroupReader, *, tp: int,
                 pp: int, layers_per_stage: Sequence[int] | None = None, progress: bool = True,
                 describe_group: GroupReader | None = None) -> Path:
    """Write the model of `read_group` as a (tp, pp) checkpoint iteration under `root`, atomically.

    With `describe_group` (read_group's shapes and dtypes as meta tensors) each shard file is
    streamed group by group; without it each shard is built whole before it is written.
    """
    validate_parallel(config, ParallelConfig(tp=tp, pp=pp))
    stages = partition_layers(config.num_layers, pp, layers_per_stage, "--target-pipeline-parallel-size")
    bar = tqdm(total=tp * pp, desc=f"writing tp={tp} pp={pp} shards", unit="shard", disable=not progress)

    def shards() -> Iterator[tuple[int, int, ShardStream]]:
        for pp_rank, layers in enumerate(stages):
            for tp_rank in range(tp):
                where = {"tp": tp, "tp_rank": tp_rank, "first": pp_rank == 0, "last": pp_rank == pp - 1}
                if describe_group is None:
                    model = stage_shard(config, read_group, layers, **where)
                    yield tp_rank, pp_rank, ShardStream(shard_record(config, model, tp, pp))
                else:
                    model = as_meta(stage_shard(config, describe_group, layers, **where))
                    yield tp_rank, pp_rank, ShardStream(shard_record(config, model, tp, pp),
                                                        model_fills(stage_groups(config, read_group, layers, **where)))
                del model
                bar.update()

    try:
        return write_all_shards(Path(root), iteration, shards(), pp)
    finally:
        bar.close()
