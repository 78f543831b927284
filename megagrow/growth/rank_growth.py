"""In-run growth on every rank: each rank builds its own stage of the grown model, reading no other rank's files.

The grown run keeps the base run's tp and pp, so tp rank r of every grown stage needs the
tp-r shards of its source layers (G_stack: grown layer t reads base layer t mod L), which
may live on any base stage. The base run has just saved its checkpoint, and every rank
finds its own (tp, pp) shard in its --save directory (written by its dp rank 0 on a shared
filesystem, or by its node on a local disk). Each base layer is read, memory-mapped, by its
stage and broadcast over the pipeline group (the stages holding the same tp shard of the
same replica), one parameter and kind at a time:

    base layer s, from its stage's file -> every stage     weights [shard shape]; with
                                                            --stack-optimizer-state also the
                                                            fp32 exp_avg, exp_avg_sq (masters)

and each stage copies it straight into the grown model's parameters (before its optimizer
is built), then into the optimizer's own layout through the model-space record
(megagrow/checkpoint/optimizer_layout.py): megagrow's plain or distributed optimizer, or
DeepSpeed at any ZeRO stage. So nodes with local disks grow, every rank's stage equals what
tools/stack_checkpoint.py writes for it, and memory stays near one layer above the grown
run's own, as the offline tool's does. Embedding, final norm and head stay on the first and
last stages, where they were.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagrow.checkpoint import names
from megagrow.checkpoint.megatron_state import MEGAGROW_KEY
from megagrow.checkpoint.optimizer_layout import ADAM_MOMENTS, MASTER, STATE_KINDS, WEIGHT, param_state, stage_record
from megagrow.checkpoint.reader import RankShard
from megagrow.checkpoint.tp_layout import shard_shape, split_for_tp
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.depth import grow_layer
from megagrow.growth.operators import GrowthSpec, layer_sources
from megagrow.parallel import state


class RankGrowth:
    """The start of the grown phase on this rank: its stage of the grown model, built from the base checkpoint."""

    def __init__(self, base_root, iteration: int, spec: GrowthSpec, base: ModelConfig, grown: ModelConfig,
                 base_stages: list[range], grown_layers: range, stack_optimizer: bool):
        self.shard = RankShard(base_root, iteration, state.tp_rank(), state.pp_rank(), state.pp_size())
        if self.shard.config != base:
            raise UserError(f"{self.shard.path}: the base checkpoint's model differs from this run's")
        self.spec, self.base, self.grown = spec, base, grown
        self.base_stages, self.grown_layers = base_stages, grown_layers
        self.sources = layer_sources(spec, base.num_layers)
        record = self.shard.file[MEGAGROW_KEY]
        self.optimizer = record.get("optimizer") if stack_optimizer else None
        if stack_optimizer and not (self.optimizer or {}).get("params"):
            raise UserError(f"{self.shard.path}: the base was saved without its optimizer state (--no-save-optim?); "
                            f"--stack-optimizer-state needs it")
        self.progress, self.scheduler = dict(record["progress"]), record["scheduler"]
        self.growth = {"operator": spec.operator, "paper_name": spec.growth_operator.paper_name,
                       "factor": spec.factor, "layout": spec.depth_layout, "seed": spec.seed,
                       "source": "in-run growth", "source_iteration": iteration, "source_num_layers": base.num_layers}

    # ---- reading the base stage's tensors, and sending them down the pipeline -----------------

    def _own(self, kind: str, name: str) -> torch.Tensor | None:
        if kind == WEIGHT:
            return self.shard.model[name]
        return self.optimizer["params"][name][kind]

    def _kinds(self) -> list[str]:
        if self.optimizer is None:
            return []
        sample = next(iter(self.optimizer["params"].values()))
        return [kind for kind in STATE_KINDS if sample[kind] is not None]  # masters only where they are not weights

    def _base_layers(self, kind: str):
        """(base layer, suffix, this tp rank's tensor of that kind) for every base layer, received from its stage."""
        ranks, group, my_stage = state.pp_group_ranks(), state.pp_group(), state.pp_rank()
        dtype = self.base.torch_dtype if kind == WEIGHT else torch.float32
        for stage, layers in enumerate(self.base_stages):
            for layer in layers:
                for suffix in names.LAYER_SUFFIXES:
                    if stage == my_stage:
                        tensor = self._own(kind, names.layer_param_name(layer - layers.start, suffix)).to(dtype)
                    else:
                        shape = shard_shape(names.layer_param_name(layer, suffix), self.base, state.tp_size())
                        tensor = torch.empty(shape, dtype=dtype)
                    if len(self.base_stages) > 1:
                        tensor = tensor.contiguous()
                        dist.broadcast(tensor, src=ranks[stage], group=group)  # [shard shape] from its stage
                    yield layer, suffix, tensor

    def _targets(self) -> dict[int, list[int]]:
        """Base layer -> the local numbers of the grown layers on this stage that copy it."""
        targets: dict[int, list[int]] = {}
        for local, layer in enumerate(self.grown_layers):
            if self.sources[layer] is not None:
                targets.setdefault(self.sources[layer], []).append(local)
        return targets

    # ---- the Trainer's two phases --------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, trainer) -> None:
        """Phase 1: the grown stage's weights, copied into the model a parameter at a time."""
        params = dict(trainer.model.named_parameters())
        for name, tensor in self.shard.model.items():  # embedding, final norm, head: this stage's own
            if names.split_layer_name(name) is None and name in params:
                params[name].copy_(tensor)
        targets = self._targets()
        for layer, suffix, tensor in self._base_layers(WEIGHT):
            for local in targets.get(layer, []):
                params[names.layer_param_name(local, suffix)].copy_(tensor)
        for local, layer in enumerate(self.grown_layers):
            if self.sources[layer] is None:  # depth:zero / depth:random: a new layer, drawn whole, cut for this rank
                new = grow_layer(None, layer, self.grown, self.spec.growth_operator.fill, self.spec.seed,
                                 self.base.torch_dtype)
                for suffix, full in new.items():
                    cut = split_for_tp(names.layer_param_name(layer, suffix), full, self.grown, state.tp_size())
                    params[names.layer_param_name(local, suffix)].copy_(cut[state.tp_rank()])

    def load_state(self, trainer) -> None:
        """Phase 2: the stacked Adam state (a layer's parameters at a time), progress and LR schedule."""
        optimization = trainer.optimization
        if self.optimizer is not None:
            step = max(entry["step"] for entry in self.optimizer["params"].values())
            own = {name: entry for name, entry in self.optimizer["params"].items()
                   if names.split_layer_name(name) is None}
            optimization.load_optimizer_record(stage_record(own, self.optimizer.get("loss_scaler")))
            kinds, targets = self._kinds(), self._targets()
            streams = [self._base_layers(kind) for kind in kinds]
            for items in zip(*streams):  # one (layer, suffix) at a time, in every kind
                layer, suffix = items[0][:2]
                values = {kind: item[2] for kind, item in zip(kinds, items)}
                records = {names.layer_param_name(local, suffix): param_state(
                    *(values[m].clone() for m in ADAM_MOMENTS), values[MASTER].clone() if MASTER in values else None,
                    step) for local in targets.get(layer, [])}
                if records:
                    optimization.load_optimizer_record(stage_record(records, None))
        for name, value in self.progress.items():
            setattr(trainer.progress, name, value)
        optimization.scheduler.load_state_dict(self.scheduler)
        trainer.growth_record = self.growth
