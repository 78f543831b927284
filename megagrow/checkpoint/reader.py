"""Read any checkpoint megagrow accepts as full tensors, one group at a time.

Sources: megagrow's own checkpoints and Megatron-LM's, in the `torch` format (per-rank
files, any tp/pp) or the `torch_dist` format; and megagrow's checkpoints from before it
adopted megatron-core's names (megagrow_v1.py), so old runs can be upgraded.

Full tensors are grouped so that tools can stream a model instead of holding it whole:

    "embedding"   embedding.word_embeddings.weight
    0 .. L-1      the six parameters of layer N (`decoder.layers.N.…`, global numbering)
    "head"        decoder.final_layernorm.weight, and output_layer.weight unless tied

`read_group` merges one group from the tp shards of the stage holding it (torch format) or
from the chunks it overlaps (torch_dist); files are memory-mapped afresh for each read, so
reading layer by layer keeps resident memory near one layer. The model config comes from
the checkpoint's megagrow record or Megatron-LM's `args` (megatron_args.py) and is checked
against the tensors' shapes before anything is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megagrow.checkpoint import megagrow_v1, megatron_optimizer, names
from megagrow.checkpoint.layout import (
    RELEASE,
    TORCH,
    TORCH_DIST,
    Iteration,
    checkpoint_format,
    checkpoint_layout,
    iteration_dir,
    read_tracker,
    shard_dir_name,
    shard_path,
)
from megagrow.checkpoint.megatron_args import model_config_from_args, parallel_sizes_from_args
from megagrow.checkpoint.megatron_state import MEGAGROW_KEY, scheduler_steps
from megagrow.checkpoint.optimizer_layout import (EXP_AVG, MASTER, WEIGHT, dist_state_key, dist_state_keys,
                                                  megatron_common_step)
from megagrow.checkpoint.safe_load import load_file
from megagrow.checkpoint.torch_dist import TorchDistReader, param_key, read_full
from megagrow.checkpoint.tp_layout import full_shape, merge_from_tp, shard_shape
from megagrow.config import ModelConfig
from megagrow.errors import UserError

EMBEDDING_GROUP = "embedding"
HEAD_GROUP = "head"
Group = int | str
# group -> {full parameter name: full tensor}
GroupReader = Callable[[Group], dict[str, torch.Tensor]]

MEGAGROW, MEGATRON, MEGAGROW_V1 = "megagrow", "Megatron-LM", "megagrow (before megatron-core names)"


@dataclass
class RunPosition:
    """Where a saved run stood: its progress record and its LR schedule's optimizer steps (None: unknown)."""

    progress: dict
    scheduler_steps: int | None


def group_keys(config: ModelConfig) -> list[Group]:
    """Every group of a model, in the order of the forward pass."""
    return [EMBEDDING_GROUP, *range(config.num_layers), HEAD_GROUP]


def group_param_names(group: Group, config: ModelConfig) -> list[str]:
    """Full parameter names in one group."""
    if group == EMBEDDING_GROUP:
        return [names.EMBEDDING]
    if group == HEAD_GROUP:
        return [names.FINAL_NORM] + ([] if config.tie_embeddings else [names.OUTPUT_LAYER])
    return [names.layer_param_name(group, suffix) for suffix in names.LAYER_SUFFIXES]


def origin_of(record: dict) -> str:
    """Who wrote a shard file or torch_dist common state: MEGAGROW, MEGATRON or MEGAGROW_V1."""
    if isinstance(record.get(MEGAGROW_KEY), dict):
        return MEGAGROW
    if "args" in record:
        return MEGATRON
    if megagrow_v1.is_v1_record(record):
        return MEGAGROW_V1
    raise ValueError("unrecognised")


def config_of(record: dict, where: str, vocab_size: int | None = None) -> ModelConfig:
    """The model config recorded in a shard file or torch_dist common state, whoever wrote it."""
    try:
        origin = origin_of(record)
    except ValueError:
        raise UserError(f"{where}: holds no model description (no args or megagrow record); it is not a Megatron "
                        f"or megagrow checkpoint") from None
    if origin == MEGAGROW:
        try:
            config = ModelConfig(**record[MEGAGROW_KEY]["config"]["model"])
        except (KeyError, TypeError) as err:
            raise UserError(f"{where}: its megagrow record does not describe a model ({err})") from None
        return config
    if origin == MEGAGROW_V1:
        return megagrow_v1.model_config(record, where)
    return model_config_from_args(record["args"], where, vocab_size=vocab_size)


def run_position_of(common: dict, origin: str, iteration: Iteration) -> RunPosition | None:
    """Where a saved run stood, from a shard file's (or common.pt's) entries; None for a model-only checkpoint."""
    if origin == MEGAGROW:
        record = common[MEGAGROW_KEY]
        if "progress" not in record:
            return None
        steps = record.get("scheduler", {}).get("num_steps")
        return RunPosition(dict(record["progress"]), None if steps is None else int(steps))
    if origin == MEGAGROW_V1:
        if "progress" not in common:
            return None
        return RunPosition(dict(common["progress"]), int(common["scheduler"]["num_steps"]))
    if iteration == RELEASE or not common.get("iteration"):
        return None  # Megatron-LM's converted / release checkpoints start a run
    args = common["args"]
    progress = {"iteration": int(common["iteration"]),
                "consumed_samples": int(getattr(args, "consumed_train_samples", 0) or 0),
                "skipped_steps": 0, "consecutive_skipped_steps": 0,
                # Megatron-LM counts its own FLOPs (attention included); the nearest record of the run's compute.
                "consumed_flops": float(common.get("num_floating_point_operations_so_far") or 0.0)}
    scheduler, batch = common.get("opt_param_scheduler"), getattr(args, "global_batch_size", None)
    steps = scheduler_steps(scheduler, batch) if scheduler and batch else None
    return RunPosition(progress, steps)


def distrib_optim_beside(shard: Path) -> bool:
    """Whether Megatron-LM's torch format keeps a distributed optimizer's state (flat gradient-buffer ranges) beside
    this model_optim_rng.pt."""
    return (shard.parent / "distrib_optim.pt").exists()


class RankShard:
    """One rank's file of a torch-format checkpoint, read without the others (which a node-local disk may lack)."""

    def __init__(self, root: str | os.PathLike, iteration: Iteration, tp_rank: int, pp_rank: int, pp: int,
                 vocab_size: int | None = None):
        self.root, self.iteration, self.format = Path(root), iteration, TORCH
        self.path = shard_path(root, iteration, tp_rank, pp_rank, pp)
        self.file = load_file(self.path, mmap=True)
        self.common = {k: v for k, v in self.file.items() if k not in ("model", "optimizer")}
        where = str(self.path.parent)
        self.origin = CheckpointReader._origin(self.file, where)
        self.config = config_of(self.file, where, vocab_size)
        if "model" not in self.file:
            raise UserError(f"{where}: holds no model (a virtual pipeline's chunks?); megagrow reads checkpoints "
                            f"without a virtual (interleaved) pipeline")
        if self.origin == MEGAGROW_V1:
            tp = megagrow_v1.recorded_layout(self.file)[0]
            self.model = megagrow_v1.canonical_model_state(self.file["model"], self.config, tp, where)
        else:
            self.model = names.canonical_model_state(self.file["model"], where)
        layers = {names.split_layer_name(n)[0] for n in self.model if names.split_layer_name(n)}
        self.num_layers = len(layers)

    @property
    def has_buffer_layout_optimizer_state(self) -> bool:
        """Whether Megatron-LM's distributed optimizer saved its state beside this file, in gradient-buffer layout."""
        return self.origin == MEGATRON and distrib_optim_beside(self.path)

    def recorded_layout(self) -> tuple[int, int]:
        """(tp, pp) the file says it was saved with."""
        if self.origin == MEGAGROW_V1:
            return megagrow_v1.recorded_layout(self.file)
        return parallel_sizes_from_args(self.file["args"])

    def run_position(self) -> RunPosition | None:
        """Where the saved run stood, from this file's records."""
        return run_position_of(self.common, self.origin, self.iteration)


class CheckpointReader:
    """One saved iteration of a megagrow or Megatron-LM checkpoint, torch or torch_dist, read as full tensors.

    `vocab_size` gives the vocabulary where the record does not (Megatron-LM's args often have
    only the padded size; the tokenizer knows the real one).
    """

    def __init__(self, root: str | os.PathLike, iteration: Iteration | None = None, *, vocab_size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"checkpoint directory not found: {self.root} (check --load)")
        if iteration is None:
            iteration = read_tracker(self.root)
            if iteration is None:
                raise UserError(f"no checkpoint in {self.root}: latest_checkpointed_iteration.txt is missing "
                                f"(check --load, or pass --iteration)")
        self.iteration = iteration
        self.format = checkpoint_format(self.root, iteration)
        if self.format == TORCH_DIST:
            self._dist = TorchDistReader(iteration_dir(self.root, iteration))
            self.common = self._dist.common
            where = str(iteration_dir(self.root, iteration))
            self.origin = self._origin(self.common, where)
            self.config = config_of(self.common, where, vocab_size)
            self.tp, self.pp = self._dist_layout()
            self._check_dist_shapes()
        else:
            self._dist = None
            self.tp, self.pp = checkpoint_layout(self.root, iteration)
            self._files = {(t, p): load_file(self.shard_path(t, p), mmap=True) for p in range(self.pp) for t in range(self.tp)}
            self.common = {k: v for k, v in self._files[0, 0].items() if k not in ("model", "optimizer")}
            self.origin = self._origin(self._files[0, 0], self._where(0, 0))
            self.config = config_of(self._files[0, 0], self._where(0, 0), vocab_size)
            self._check_recorded_layout()
            for (t, p), file in self._files.items():
                if config_of(file, self._where(t, p), vocab_size) != self.config:
                    raise UserError(f"{self._where(t, p)}: its model config differs from "
                                    f"{shard_dir_name(0, 0, self.pp)}'s; the shards come from different runs")
            self._stage_models = {p: self._stage_model(0, p, self._files[0, p]) for p in range(self.pp)}
            self._layer_offsets = self._find_layer_offsets()
            self._check_shapes()

    # ---- layout and checks -----------------------------------------------------------------------

    @staticmethod
    def _origin(record: dict, where: str) -> str:
        try:
            return origin_of(record)
        except ValueError:
            raise UserError(f"{where}: holds no model description (no args or megagrow record); it is not a "
                            f"Megatron or megagrow checkpoint") from None

    @property
    def directory(self) -> Path:
        """The iteration's directory."""
        return iteration_dir(self.root, self.iteration)

    @property
    def torch_dist(self) -> TorchDistReader:
        """The torch_dist reader of this iteration (torch_dist format only)."""
        if self._dist is None:
            raise ValueError("not a torch_dist checkpoint")
        return self._dist

    def shard_path(self, tp_rank: int, pp_rank: int) -> Path:
        """File of one torch-format shard."""
        return shard_path(self.root, self.iteration, tp_rank, pp_rank, self.pp)

    def _where(self, tp_rank: int, pp_rank: int) -> str:
        return str(self.shard_path(tp_rank, pp_rank).parent)

    def stage_model(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        """One torch-format shard's model in megatron-core's names, layers numbered from the stage's first."""
        return self._stage_model(tp_rank, pp_rank, self._files[tp_rank, pp_rank])

    def _stage_model(self, tp_rank: int, pp_rank: int, record: dict) -> dict[str, torch.Tensor]:
        where = self._where(tp_rank, pp_rank)
        if "model" not in record:
            virtual = sorted(k for k in record if k.startswith("model") and k[5:].isdigit())
            detail = "virtual pipeline chunks " + ", ".join(virtual) if virtual else "no model"
            raise UserError(f"{where}: holds {detail}; megagrow reads checkpoints without a virtual (interleaved) "
                            f"pipeline")
        if self.origin == MEGAGROW_V1:
            return megagrow_v1.canonical_model_state(record["model"], self.config, self.tp, where)
        return names.canonical_model_state(record["model"], where)

    def _check_recorded_layout(self) -> None:
        # checkpoint_layout infers the sizes from the highest ranks present, so a missing last
        # rank would pass for a smaller layout; the record says what was saved.
        record = self._files[0, 0]
        if self.origin == MEGAGROW_V1:
            recorded = megagrow_v1.recorded_layout(record)
        else:
            recorded = parallel_sizes_from_args(record["args"]) if "args" in record else (self.tp, self.pp)
        if tuple(recorded) != (self.tp, self.pp):
            raise UserError(f"{iteration_dir(self.root, self.iteration)}: shards missing for the tp={recorded[0]} "
                            f"pp={recorded[1]} layout it was saved with (found tp={self.tp} pp={self.pp}); "
                            f"the checkpoint is incomplete")

    def _find_layer_offsets(self) -> list[int]:
        counts = [len({names.split_layer_name(n)[0] for n in model if names.split_layer_name(n)})
                  for _, model in sorted(self._stage_models.items())]
        offsets = [sum(counts[:p]) for p in range(self.pp)]
        if sum(counts) != self.config.num_layers:
            raise UserError(f"{self.root}: iteration {self.iteration} holds {sum(counts)} layers over its stages "
                            f"({counts}), its record says {self.config.num_layers}; the checkpoint is incomplete")
        self.layers_per_stage = counts
        return offsets

    def _check_shapes(self) -> None:
        for p, model in self._stage_models.items():
            offset = self._layer_offsets[p]
            for name, tensor in model.items():
                global_name = names.renumber_layers({name: None}, offset).popitem()[0]
                expected = shard_shape(global_name, self.config, self.tp)
                if tuple(tensor.shape) != expected:
                    raise UserError(f"{self._where(0, p)}: {name} has shape {tuple(tensor.shape)}, the recorded model "
                                    f"(tp={self.tp}) needs {expected}; the args and the weights disagree")

    def _dist_layout(self) -> tuple[int, int]:
        args = self.common.get("args")
        tp, pp = parallel_sizes_from_args(args) if args is not None else (1, 1)
        counts = [self.config.num_layers // pp + (1 if p < self.config.num_layers % pp else 0) for p in range(pp)]
        self.layers_per_stage = counts
        return tp, pp

    def _check_dist_shapes(self) -> None:
        config, dist = self.config, self._dist
        for name in group_param_names(EMBEDDING_GROUP, config) + group_param_names(HEAD_GROUP, config):
            expected = full_shape(name, config)
            shape = dist.shape(name)
            rows_ok = shape[0] >= expected[0] if name != names.FINAL_NORM else shape == expected
            if not rows_ok or shape[1:] != expected[1:]:
                raise UserError(f"{dist.directory}: {name} has shape {shape}, the recorded model needs {expected}; "
                                f"the args and the weights disagree")
        for suffix in names.LAYER_SUFFIXES:
            key = names.stacked_key(suffix)
            expected = (config.num_layers, *full_shape(names.layer_param_name(0, suffix), config))
            if dist.shape(key) != expected:
                raise UserError(f"{dist.directory}: {key} has shape {dist.shape(key)}, the recorded model needs "
                                f"{expected}; the args and the weights disagree")

    # ---- reading ---------------------------------------------------------------------------------

    def _stage_of(self, group: Group) -> int:
        if group == EMBEDDING_GROUP:
            return 0
        if group == HEAD_GROUP:
            return self.pp - 1
        stage = 0
        while stage + 1 < self.pp and group >= self._layer_offsets[stage + 1]:
            stage += 1
        return stage

    def _local_name(self, name: str, stage: int) -> str:
        return names.renumber_layers({name: None}, -self._layer_offsets[stage]).popitem()[0]

    def _group_shards(self, group: Group, models: list[dict]) -> dict[str, list[torch.Tensor]]:
        stage = self._stage_of(group)
        shards = {}
        for name in group_param_names(group, self.config):
            local = self._local_name(name, stage)
            for t, model in enumerate(models):
                if local not in model:
                    raise UserError(f"{self._where(t, stage)}: tensor {local} is missing; the checkpoint is incomplete "
                                    f"or was saved by another model")
            shards[name] = [model[local] for model in models]
        return shards

    def read_group(self, group: Group, kind: str = WEIGHT) -> dict[str, torch.Tensor]:
        """Full (unsharded, unpadded) tensors of one group: the weights, or one kind of their optimizer state
        (exp_avg, exp_avg_sq, master; a master recorded as None is the fp32 weight itself)."""
        if kind != WEIGHT and not self.has_optimizer_state:
            raise UserError(f"{self.directory}: holds no Adam state per parameter to read")
        if self._dist is not None:
            result = {}
            for name in group_param_names(group, self.config):
                prefixes = [""] if kind == WEIGHT else dist_state_keys(kind, "")
                prefix = next((p for p in prefixes if p + param_key(name) in self._dist), None)
                if kind == MASTER and prefix is None:
                    result[name] = self.read_group(group)[name].float()  # fp32 weights are their own masters
                else:
                    result[name] = self._trim(name, read_full(self._dist, name, self.config.num_layers,
                                                              prefix if prefix is not None else prefixes[0]))
            return result
        stage = self._stage_of(group)
        # Mapped afresh and dropped after the merge (which copies), so the pages read leave this
        # process's resident set with the group instead of accumulating to the whole base model.
        files = [load_file(self.shard_path(t, stage), mmap=True) for t in range(self.tp)]
        models = [self._stage_model(t, stage, file) for t, file in enumerate(files)]
        if kind != WEIGHT:
            models = [self._stage_state(t, stage, file, model, kind) for t, (file, model) in enumerate(zip(files, models))]
        return {name: merge_from_tp(name, shards, self.config) for name, shards in self._group_shards(group, models).items()}

    def _stage_state(self, tp_rank: int, pp_rank: int, file: dict, model: dict, kind: str) -> dict[str, torch.Tensor]:
        """One shard's optimizer state of `kind` by parameter name (fp32; masters of fp32 weights are the weights)."""
        if self.origin == MEGAGROW:
            params = file[MEGAGROW_KEY]["optimizer"]["params"]
        else:
            params = megatron_optimizer.adam_state_by_name(file.get("optimizer"), model, self._where(tp_rank, pp_rank))
        state = {}
        for name, weight in model.items():
            record = params.get(name)
            if record is None:
                raise UserError(f"{self._where(tp_rank, pp_rank)}: no optimizer state for {name} (never stepped?); "
                                f"grow or reshard it without the optimizer state")
            value = record[kind]
            state[name] = weight.float() if value is None else value
        return state

    def group_reader(self, kind: str = WEIGHT) -> GroupReader:
        """A GroupReader of the weights or of one kind of optimizer state."""
        return lambda group: self.read_group(group, kind)

    @property
    def has_optimizer_state(self) -> bool:
        """Whether Adam state per parameter was saved: megagrow's (unless --no-save-optim), or Megatron-LM's from its
        non-distributed optimizer (torch or torch_dist) or its fully reshardable distributed one (torch_dist)."""
        if self._dist is not None:
            return self._dist_optimizer_key in self._dist and self._dist_optimizer_steps() is not None
        if self.origin != MEGAGROW:
            return self.origin == MEGATRON and megatron_optimizer.holds_adam_state(self._files[0, 0].get("optimizer"))
        return bool((self._files[0, 0][MEGAGROW_KEY].get("optimizer") or {}).get("params"))

    @property
    def has_buffer_layout_optimizer_state(self) -> bool:
        """Whether the checkpoint holds Megatron-LM's distributed-optimizer state in its gradient-buffer layout
        (torch_dist `dp_reshardable`, or the torch format's distrib_optim.pt), which is not model space."""
        if self._dist is None:
            return self.origin == MEGATRON and distrib_optim_beside(self.shard_path(0, 0))
        return any(key.startswith("optimizer.distributed.") for key in self._dist.keys)

    def _dist_optimizer_steps(self) -> int | None:
        record = (self.common.get(MEGAGROW_KEY) or {}).get("optimizer")
        if record is not None and record.get("step") is not None:
            return int(record["step"])
        return megatron_common_step(self.common.get("optimizer"))

    @property
    def _dist_optimizer_key(self) -> str:
        return dist_state_key(EXP_AVG, names.EMBEDDING)

    def optimizer_steps(self) -> int:
        """Adam steps the saved optimizer had taken."""
        if self._dist is not None:
            return self._dist_optimizer_steps() or 0
        if self.origin != MEGAGROW:
            return megatron_optimizer.adam_steps(self._files[0, 0]["optimizer"])
        params = self._files[0, 0][MEGAGROW_KEY]["optimizer"]["params"]
        return max(int(record["step"]) for record in params.values())

    def _trim(self, name: str, full: torch.Tensor) -> torch.Tensor:
        # torch_dist keeps the vocabulary padded for the tp it was saved with.
        return full[:self.config.vocab_size].clone() if name in (names.EMBEDDING, names.OUTPUT_LAYER) else full

    def describe_group(self, group: Group) -> dict[str, torch.Tensor]:
        """read_group's result as meta tensors (full shapes, saved dtypes), reading no tensor data."""
        result = {}
        for name in group_param_names(group, self.config):
            if self._dist is not None:
                key = name if names.split_layer_name(name) is None else names.stacked_key(names.split_layer_name(name)[1])
                dtype = self._dist.dtype(key)
            else:
                dtype = self._stage_models[self._stage_of(group)][self._local_name(name, self._stage_of(group))].dtype
            result[name] = torch.empty(full_shape(name, self.config), dtype=dtype, device="meta")
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole full state dict (holds the model in memory; prefer read_group for large models)."""
        return {name: tensor for group in group_keys(self.config) for name, tensor in self.read_group(group).items()}

    def shard_file(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        """The whole (memory-mapped) file of one torch-format shard, as saved."""
        if self._dist is not None:
            raise ValueError("a torch_dist checkpoint has no per-rank shard files")
        return self._files[tp_rank, pp_rank]

    def run_position(self) -> RunPosition | None:
        """Where the saved run stood (iteration, samples consumed, LR steps), or None for a model-only checkpoint."""
        return run_position_of(self.common, self.origin, self.iteration)

    @property
    def stage_dirs(self) -> list[str]:
        """Shard directory names of this checkpoint's layout, for messages."""
        return [shard_dir_name(t, p, self.pp) for p in range(self.pp) for t in range(self.tp)]


def recorded_model_config(root: str | os.PathLike, vocab_size: int | None = None) -> ModelConfig | None:
    """The model a checkpoint directory records (its latest iteration), read from one file; None without a checkpoint.

    What --use-checkpoint-args needs before anything is built: megagrow's record or Megatron-LM's
    args of the first shard (torch), common.pt (torch_dist) or DeepSpeed's client state.
    """
    root = Path(root)
    iteration = read_tracker(root) if root.is_dir() else None
    if iteration is None:
        return None
    if (root / "latest").is_file():  # DeepSpeed's tag file: the client state travels in its model states
        tag = (root / "latest").read_text().strip()
        files = sorted((root / tag).glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise UserError(f"{root / tag}: no mp_rank_00 model states; the DeepSpeed checkpoint is incomplete")
        return config_of(load_file(files[0], mmap=True), str(files[0]), vocab_size)
    if checkpoint_format(root, iteration) == TORCH_DIST:
        common = iteration_dir(root, iteration) / "common.pt"
        return config_of(load_file(common), str(common), vocab_size)
    tp, pp = checkpoint_layout(root, iteration)
    first = shard_path(root, iteration, 0, 0, pp)
    return config_of(load_file(first, mmap=True), str(first), vocab_size)
