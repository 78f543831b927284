"""The base run's state carried into a grown checkpoint, so training resumes with the grown model.

A grown shard with run state holds, besides model and config, what checkpoint_state.load
restores on a resume: `progress` (iteration, consumed samples), `scheduler` (LR schedule
position), `rng` and `optimizer` in MixedPrecisionOptimizer.state_dict's form:

    optimizer.optimizer   torch AdamW state_dict over the stage's fragments: one param group
                          per weight-decay choice (matrices, then vectors), each listing its
                          fragments in reverse parameter order (the reducer's bucket order)
    optimizer.masters     fp32 master per fragment in that order; None where the fp32
                          parameter is its own master
    optimizer.loss_scaler fp16 loss scale state, or None

The optimizer is fresh (no Adam state: moments start at zero, as in a new run) unless
`stack_optimizer_state`, which gives every grown parameter the Adam moments, step count and
fp32 master of the base parameter it was copied from — G_stack applied to the optimizer.
Only the layout of the non-distributed optimizer is written; a grown checkpoint with run
state loads in runs without --use-distributed-optimizer and without --deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrow.checkpoint.reshard import CheckpointReader
from megagrow.checkpoint.tp_layout import (
    layer_param_name,
    merge_from_tp,
    parse_layer_param,
    split_for_tp,
)
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.operators import GrowthSpec, layer_sources
from megagrow.growth.tensors import DIRECT, EMBEDDING, OUTPUT_LAYER
from megagrow.training.checkpointing import shard_path
from megagrow.training.optimizer import uses_weight_decay

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class RunStateOptions:
    """What a grown checkpoint carries over from the base run besides the weights."""

    # Adam moments, step counts and fp32 masters stacked like the weights; else a fresh optimizer.
    stack_optimizer_state: bool = False


def adam_param_order(model: dict[str, torch.Tensor]) -> list[list[str]]:
    """A stage's parameter names as its AdamW state indexes them: per param group, in index order."""
    fragments = list(reversed(list(model)))  # the reducer buckets parameters in reverse order
    decayed = [name for name in fragments if uses_weight_decay(model[name])]
    not_decayed = [name for name in fragments if not uses_weight_decay(model[name])]
    return [group for group in (decayed, not_decayed) if group]


class _BaseStage:
    """The optimizer state of one base shard, by parameter name."""

    def __init__(self, shard: dict, where: str):
        saved = shard.get("optimizer")
        if saved is None:
            raise UserError(f"{where}: no optimizer state in the shard (saved with --use-distributed-optimizer or "
                            f"DeepSpeed?); carrying the run state needs the native non-distributed optimizer's")
        model = shard["model"]
        groups = adam_param_order(model)
        saved_groups = saved["optimizer"]["param_groups"]
        if [len(names) for names in groups] != [len(group["params"]) for group in saved_groups]:
            raise UserError(f"{where}: the optimizer state does not match the shard's parameters; the checkpoint is "
                            f"damaged or was written by another megagrow version")
        self.state = {name: saved["optimizer"]["state"].get(index)
                      for names, group in zip(groups, saved_groups) for name, index in zip(names, group["params"])}
        self.masters = dict(zip(reversed(list(model)), saved["masters"]))
        # Hyper-parameters (betas, eps, weight decay, ...) by whether the group decays.
        self.group_settings = {uses_weight_decay(model[names[0]]): {k: v for k, v in group.items() if k != "params"}
                               for names, group in zip(groups, saved_groups)}
        self.loss_scaler = saved.get("loss_scaler")


class RunStateWriter:
    """Builds the run-state entries of each grown shard from the base checkpoint's shards."""

    def __init__(self, reader: CheckpointReader, spec: GrowthSpec, grown: ModelConfig, tp: int,
                 options: RunStateOptions):
        self.base_config, self.grown, self.tp, self.options = reader.config, grown, tp, options
        if options.stack_optimizer_state and spec.growth_operator.fill != DIRECT:
            raise UserError(f"--stack-optimizer-state needs every grown layer to copy a base layer "
                            f"(depth:stack or depth:interpolate), not {spec.operator}")
        self.sources = layer_sources(spec, reader.config.num_layers)
        # Memory-mapped like the reader's: moments are paged in one parameter at a time.
        shards = {(t, p): torch.load(shard_path(reader.root, reader.iteration, t, p, reader.pp), map_location="cpu",
                                     weights_only=True, mmap=True)
                  for p in range(reader.pp) for t in range(reader.tp)}
        first = shards[0, 0]
        where = str(shard_path(reader.root, reader.iteration, 0, 0, reader.pp).parent)
        if "progress" not in first:
            raise UserError(f"{where}: the base checkpoint holds a model only (exported or converted), no run state "
                            f"to carry over; grow it without run state")
        self.progress, self.scheduler, self.rng = first["progress"], first["scheduler"], first["rng"]
        # base parameter name -> [its optimizer state on tp rank 0, 1, ...]
        self.stages: dict[str, list[_BaseStage]] = {}
        for p in range(reader.pp):
            stage = [_BaseStage(shards[t, p], str(shard_path(reader.root, reader.iteration, t, p, reader.pp).parent))
                     for t in range(reader.tp)]
            for name in shards[0, p]["model"]:
                self.stages.setdefault(name, stage)
        self.group_settings = self.stages[EMBEDDING][0].group_settings
        self.loss_scaler = self.stages[EMBEDDING][0].loss_scaler

    def _base_name(self, name: str) -> str:
        parsed = parse_layer_param(name)
        if parsed is not None:
            return layer_param_name(self.sources[parsed[0]], parsed[1])
        if name == OUTPUT_LAYER and self.base_config.tie_embeddings:
            return EMBEDDING  # a tied head's copy has the embedding's moments: their grads are summed
        return name

    def _grown_shard(self, name: str, base_shards: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
        base_name = self._base_name(name)
        full = merge_from_tp(base_name, base_shards, self.base_config)
        return split_for_tp(name, full, self.grown, self.tp)[tp_rank].clone()

    def _adam_state(self, name: str, tp_rank: int) -> dict | None:
        base_name = self._base_name(name)
        saved = [stage.state[base_name] for stage in self.stages[base_name]]
        if saved[0] is None:  # the base never stepped this parameter
            return None
        state = {"step": saved[0]["step"].clone()}
        for moment in ADAM_MOMENTS:
            state[moment] = self._grown_shard(name, [s[moment] for s in saved], tp_rank)
        return state

    def _master(self, name: str, tp_rank: int) -> torch.Tensor | None:
        base_name = self._base_name(name)
        masters = [stage.masters[base_name] for stage in self.stages[base_name]]
        return None if masters[0] is None else self._grown_shard(name, masters, tp_rank)

    def optimizer_state(self, model: dict[str, torch.Tensor], tp_rank: int) -> dict:
        """MixedPrecisionOptimizer.state_dict of the grown stage `model` (fresh, or with stacked moments)."""
        stack = self.options.stack_optimizer_state
        state, param_groups, index = {}, [], 0
        for names in adam_param_order(model):
            decays = uses_weight_decay(model[names[0]])
            settings = self.group_settings.get(decays) or next(iter(self.group_settings.values()))
            param_groups.append({**settings, "params": list(range(index, index + len(names)))})
            for name in names:
                adam = self._adam_state(name, tp_rank) if stack else None
                if adam is not None:
                    state[index] = adam
                index += 1
        masters = [self._master(name, tp_rank) if stack else None for name in reversed(list(model))]
        return {"optimizer": {"state": state, "param_groups": param_groups}, "masters": masters,
                "loss_scaler": self.loss_scaler}

    def shard_state(self, model: dict[str, torch.Tensor], tp_rank: int) -> dict:
        """The run-state entries of one grown shard."""
        return {"progress": dict(self.progress), "scheduler": self.scheduler, "rng": self.rng,
                "optimizer": self.optimizer_state(model, tp_rank)}
