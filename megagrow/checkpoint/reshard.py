"""Read a megagrow checkpoint of any (tp, pp) layout as full tensors, and write full tensors into any layout.

Full tensors are grouped so that tools can stream a model instead of holding it whole:

    "embedding"   embedding.weight
    0 .. L-1      the six parameters of layer N (`layers.N.…`)
    "head"        final_norm.weight, and output_layer.weight unless the embeddings are tied

`CheckpointReader.read_group` merges one group from the tp shards of the stage holding it.
The shard files are memory-mapped, so reading layer by layer keeps resident memory near one
layer. `save_sharded` takes any such group reader (a checkpoint, an HF directory, a grown
model) and writes a checkpoint in megagrow's layout that pretrain_gpt.py `--load` accepts as
the start of a new run (model + config only: no optimizer state, progress or RNG).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from megagrow.checkpoint.tp_layout import (
    LAYER_PARAM_SUFFIXES,
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

    def read_group(self, group: Group) -> dict[str, torch.Tensor]:
        """Full (unsharded, unpadded) tensors of one group."""
        stage = self._stage_of(group)
        tensors = {}
        for name in group_param_names(group, self.config):
            shards = []
            for t in range(self.tp):
                model = self._shards[t, stage]["model"]
                if name not in model:
                    raise UserError(f"{self._where(t, stage)}: tensor {name} is missing; the checkpoint is incomplete "
                                    f"or was saved by another model")
                shards.append(model[name])
            tensors[name] = merge_from_tp(name, shards, self.config)
        return tensors

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


def stage_shard(config: ModelConfig, read_group: GroupReader, layers: range, *, tp: int, tp_rank: int,
                first: bool, last: bool) -> dict[str, torch.Tensor]:
    """This (tp_rank, stage)'s part of the model read through `read_group`: embedding, layers, head as owned."""
    groups: list[Group] = ([EMBEDDING_GROUP] if first else []) + list(layers) + ([HEAD_GROUP] if last else [])
    model = {}
    for group in groups:
        for name, full in read_group(group).items():
            model[name] = split_for_tp(name, full, config, tp)[tp_rank]
    if config.tie_embeddings and last and not first:
        # The last stage keeps its own copy of the tied embedding as the output head.
        full = read_group(EMBEDDING_GROUP)["embedding.weight"]
        model["output_layer.weight"] = split_for_tp("embedding.weight", full, config, tp)[tp_rank]
    return model


def shard_record(config: ModelConfig, model: dict[str, torch.Tensor], tp: int, pp: int) -> dict:
    """A shard file holding a model only, which training loads as the start of a new run."""
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "model": model,
        "config": {"model": asdict(config), "parallel": asdict(ParallelConfig(tp=tp, pp=pp))},
    }


def write_all_shards(root: Path, iteration: int, shards: Iterator[tuple[int, int, dict]], pp: int) -> Path:
    """Write every (tp_rank, pp_rank, shard) of one iteration from a single process, atomically."""
    # save_checkpoint is collective: the coordinator creates the temporary directory, every
    # rank writes its shard after the first barrier, the coordinator renames and updates the
    # tracker. One process plays every rank: as coordinator it writes nothing itself, and
    # at the first barrier it writes each shard in turn, so only one shard is in memory.
    at_first_barrier = True

    def barrier() -> None:
        nonlocal at_first_barrier
        if not at_first_barrier:
            return
        at_first_barrier = False
        for tp_rank, pp_rank, shard in shards:
            save_checkpoint(root, iteration, shard, tp_rank=tp_rank, pp_rank=pp_rank, pp_size=pp,
                            barrier=lambda: None, is_coordinator=lambda: False)

    return save_checkpoint(root, iteration, None, pp_size=pp, barrier=barrier, is_coordinator=lambda: True)


def save_sharded(root: str | os.PathLike, iteration: int, config: ModelConfig, read_group: GroupReader, *, tp: int,
                 pp: int, layers_per_stage: Sequence[int] | None = None, progress: bool = True) -> Path:
    """Write the model of `read_group` as a (tp, pp) checkpoint iteration under `root`, atomically."""
    validate_parallel(config, ParallelConfig(tp=tp, pp=pp))
    stages = partition_layers(config.num_layers, pp, layers_per_stage)
    bar = tqdm(total=tp * pp, desc=f"writing tp={tp} pp={pp} shards", unit="shard", disable=not progress)

    def shards() -> Iterator[tuple[int, int, dict]]:
        for pp_rank, layers in enumerate(stages):
            for tp_rank in range(tp):
                model = stage_shard(config, read_group, layers, tp=tp, tp_rank=tp_rank, first=pp_rank == 0,
                                    last=pp_rank == pp - 1)
                yield tp_rank, pp_rank, shard_record(config, model, tp, pp)
                bar.update()

    try:
        return write_all_shards(Path(root), iteration, shards(), pp)
    finally:
        bar.close()
