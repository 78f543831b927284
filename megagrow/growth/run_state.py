"""The base run's state carried into a grown checkpoint, so training resumes with the grown model.

A grown shard with run state holds, besides the model, what training restores on a resume:
the base's progress (iteration, consumed samples; also Megatron's `args.consumed_train_samples`
and `iteration`), LR schedule position (megagrow's and Megatron's records), RNG record, and
in its megagrow record an optimizer state in MixedPrecisionOptimizer.state_dict's form:

    optimizer.optimizer   torch AdamW state_dict over the stage's fragments: one param group
                          per weight-decay choice (matrices, then vectors), each listing its
                          fragments in reverse parameter order (the reducer's bucket order)
    optimizer.masters     fp32 master per fragment in that order; None where the fp32
                          parameter is its own master
    optimizer.loss_scaler fp16 loss scale state, or None

The optimizer is fresh (no Adam state: moments start at zero, as in a new run) unless
`stack_optimizer_state`, which gives every grown parameter the Adam moments, step count and
fp32 master of the base parameter it was copied from — G_stack applied to the optimizer.
Only the layout of megagrow's non-distributed optimizer is written; a grown checkpoint with
run state loads in runs without --use-distributed-optimizer and without --deepspeed. A
Megatron-LM base carries its progress, LR schedule and RNG; its optimizer state is not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrow.checkpoint import names
from megagrow.checkpoint.megatron_state import MEGAGROW_KEY
from megagrow.checkpoint.optimizer_layout import ADAM_MOMENTS, adam_param_order, uses_weight_decay
from megagrow.checkpoint.reader import MEGAGROW, CheckpointReader
from megagrow.checkpoint.tp_layout import merge_from_tp, split_for_tp
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.operators import GrowthSpec, layer_sources
from megagrow.growth.tensors import DIRECT, EMBEDDING, OUTPUT_LAYER


@dataclass(frozen=True)
class RunStateOptions:
    """What a grown checkpoint carries over from the base run besides the weights."""

    # Adam moments, step counts and fp32 masters stacked like the weights; else a fresh optimizer.
    stack_optimizer_state: bool = False


class _BaseStage:
    """The optimizer state of one base shard, by (global) parameter name."""

    def __init__(self, shard: dict, model: dict[str, torch.Tensor], layer_offset: int, where: str):
        self.layer_offset = layer_offset
        saved = shard.get(MEGAGROW_KEY, {}).get("optimizer")
        if saved is None:
            raise UserError(f"{where}: no optimizer state in the shard (saved with --use-distributed-optimizer, "
                            f"--no-save-optim or DeepSpeed?); stacking it needs megagrow's non-distributed optimizer's")
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
        position = reader.run_position()
        if position is None:
            raise UserError(f"{reader.directory}: the base checkpoint holds a model only (exported or converted), no "
                            f"run state to carry over; grow it without run state")
        if options.stack_optimizer_state and (reader.origin != MEGAGROW or reader.format != "torch"):
            raise UserError(f"{reader.directory}: --stack-optimizer-state reads megagrow's optimizer state from "
                            f"torch-format shards; this checkpoint is {reader.origin}'s ({reader.format}): grow it "
                            f"with --carry-run-state (fresh optimizer) instead")
        self.position = position
        common = reader.common
        self.rng = common.get("rng_state")
        self.opt_param_scheduler = common.get("opt_param_scheduler")
        base_record = common.get(MEGAGROW_KEY, {})
        self.scheduler = base_record.get("scheduler", {"num_steps": position.scheduler_steps or 0})
        self.group_settings: dict[bool, dict] = {}
        self.loss_scaler = None
        # base parameter name (global numbering) -> [its optimizer state on tp rank 0, 1, ...]
        self.stages: dict[str, list[_BaseStage]] = {}
        self.fresh_from_megatron = reader.origin != MEGAGROW
        if reader.origin == MEGAGROW and reader.format == "torch":
            offset = 0
            for p in range(reader.pp):
                models = [reader.stage_model(t, p) for t in range(reader.tp)]
                stage = [_BaseStage(reader.shard_file(t, p), models[t], offset, str(reader.shard_path(t, p).parent))
                         for t in range(reader.tp)]
                for name in names.renumber_layers(models[0], offset):
                    self.stages.setdefault(name, stage)
                offset += reader.layers_per_stage[p]
            self.group_settings = self.stages[EMBEDDING][0].group_settings
            self.loss_scaler = self.stages[EMBEDDING][0].loss_scaler

    def _base_name(self, name: str) -> str:
        parsed = names.split_layer_name(name)
        if parsed is not None:
            return names.layer_param_name(self.sources[parsed[0]], parsed[1])
        if name == OUTPUT_LAYER and self.base_config.tie_embeddings:
            return EMBEDDING  # a tied head's copy has the embedding's moments: their grads are summed
        return name

    def _grown_shard(self, name: str, base_shards: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
        base_name = self._base_name(name)
        full = merge_from_tp(base_name, base_shards, self.base_config)
        return split_for_tp(name, full, self.grown, self.tp)[tp_rank].clone()

    def _adam_state(self, name: str, tp_rank: int) -> dict | None:
        base_name = self._base_name(name)
        saved = [stage.state[self._local(base_name, stage)] for stage in self.stages[base_name]]
        if saved[0] is None:  # the base never stepped this parameter
            return None
        state = {"step": saved[0]["step"].clone()}
        for moment in ADAM_MOMENTS:
            state[moment] = self._grown_shard(name, [s[moment] for s in saved], tp_rank)
        return state

    def _master(self, name: str, tp_rank: int) -> torch.Tensor | None:
        base_name = self._base_name(name)
        masters = [stage.masters[self._local(base_name, stage)] for stage in self.stages[base_name]]
        return None if masters[0] is None else self._grown_shard(name, masters, tp_rank)

    @staticmethod
    def _local(base_name: str, stage: "_BaseStage") -> str:
        return names.renumber_layers({base_name: None}, -stage.layer_offset).popitem()[0]

    def optimizer_state(self, model: dict[str, torch.Tensor], tp_rank: int, layer_offset: int = 0) -> dict:
        """MixedPrecisionOptimizer.state_dict of the grown stage `model` (local names; fresh, or stacked moments)."""
        stack = self.options.stack_optimizer_state
        state, param_groups, index = {}, [], 0
        for group in adam_param_order(model):
            decays = uses_weight_decay(model[group[0]])
            settings = self.group_settings.get(decays) or next(iter(self.group_settings.values()), {})
            param_groups.append({**settings, "params": list(range(index, index + len(group)))})
            for name in group:
                adam = self._adam_state(self._global(name, layer_offset), tp_rank) if stack else None
                if adam is not None:
                    state[index] = adam
                index += 1
        masters = [self._master(self._global(name, layer_offset), tp_rank) if stack else None
                   for name in reversed(list(model))]
        return {"optimizer": {"state": state, "param_groups": param_groups}, "masters": masters,
                "loss_scaler": self.loss_scaler}

    @staticmethod
    def _global(name: str, layer_offset: int) -> str:
        return names.renumber_layers({name: None}, layer_offset).popitem()[0]

    def shard_state(self, model: dict[str, torch.Tensor], tp_rank: int, layer_offset: int) -> dict:
        """The run-state entries of one grown shard: megagrow record parts and Megatron's records."""
        # None: "start the optimizer afresh" (a Megatron-LM base has no megagrow optimizer to take settings from).
        optimizer = None if self.fresh_from_megatron else self.optimizer_state(model, tp_rank, layer_offset)
        return {"progress": dict(self.position.progress), "scheduler": self.scheduler, "rng": self.rng,
                "opt_param_scheduler": self.opt_param_scheduler, "optimizer": optimizer}
