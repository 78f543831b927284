"""In-run growth without files: every rank builds its own stage of the grown model from the base stages in memory.

The grown run keeps the base run's tp and pp, so tp rank r of every grown stage needs the
tp-r shards of its source layers (G_stack: grown layer t reads base layer t mod L), which
may live on any base stage. Each base layer's tensors are broadcast over the pipeline group
(the stages that hold the same tp shard of the same replica), once per layer and kind:

    for each base layer s, its stage -> every stage        weights [shard shape], and with
                                                            --stack-optimizer-state the fp32
                                                            exp_avg, exp_avg_sq (and masters)

so no rank reads another's files: growth works on node-local disks, and every rank's grown
stage equals what the offline tool (megagrow/growth/stacking.py) writes for it. The Adam
state travels in model space (megagrow/checkpoint/optimizer_layout.py), so the base may have
trained with megagrow's plain or distributed optimizer or DeepSpeed at any ZeRO stage, and
the grown run with any of them. Embedding, final norm and head stay on the first and last
stages, where they were.

Memory: each stage keeps the base layers its grown layers copy (for G_stack with g >= pp,
every base layer: the whole base model's share of this tp rank, plus its moments), then the
grown stage is built from them; a layer is received at a time.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist

from megagrow.checkpoint import names
from megagrow.checkpoint.optimizer_layout import MASTER, STATE_KINDS, WEIGHT, param_state, stage_record
from megagrow.checkpoint.tp_layout import shard_shape, split_for_tp
from megagrow.config import ModelConfig
from megagrow.growth.depth import grow_layer
from megagrow.growth.operators import GrowthSpec, layer_sources
from megagrow.parallel import state
from megagrow.training.checkpoint_state import RunStart

# [kind][local name] -> tensor, kinds WEIGHT and the optimizer's state kinds
StageTensors = dict[str, dict[str, torch.Tensor]]


def _stage_tensors(trainer, stack_optimizer: bool) -> tuple[StageTensors, dict | None]:
    """This rank's weights and (collectively gathered) model-space optimizer record, by kind."""
    tensors = {WEIGHT: trainer.optimization.stage_weights()}
    record = trainer.optimization.optimizer_record() if stack_optimizer else None
    if record is not None:
        for kind in STATE_KINDS:
            values = {name: entry[kind] for name, entry in record["params"].items() if entry[kind] is not None}
            if values:
                tensors[kind] = values
    return tensors, record


def _kinds_of_all_ranks(tensors: StageTensors) -> list[str]:
    # Every stage must take part in each broadcast: agree on the kinds (a stage never holds masters alone).
    return [kind for kind in (WEIGHT, *STATE_KINDS) if kind in tensors]


def exchange_layers(tensors: StageTensors, config: ModelConfig, stages: list[range], wanted: set[int]
                    ) -> dict[int, StageTensors]:
    """The tensors of the base layers in `wanted` (global numbers), sent by the stages holding them."""
    tp, my_stage = state.tp_size(), state.pp_rank()
    ranks, group = state.pp_group_ranks(), state.pp_group()
    received: dict[int, StageTensors] = {}
    for stage, layers in enumerate(stages):
        for layer in layers:
            for kind in _kinds_of_all_ranks(tensors):
                for suffix in names.LAYER_SUFFIXES:
                    local = names.layer_param_name(layer - layers.start, suffix)
                    if stage == my_stage:
                        tensor = tensors[kind][local]
                    else:
                        dtype = config.torch_dtype if kind == WEIGHT else torch.float32
                        tensor = torch.empty(shard_shape(names.layer_param_name(layer, suffix), config, tp),
                                             dtype=dtype)
                    if len(stages) > 1:
                        dist.broadcast(tensor, src=ranks[stage], group=group)  # [shard shape] from its stage
                    if layer in wanted:
                        received.setdefault(layer, {}).setdefault(kind, {})[suffix] = tensor
    return received


def grow_stage(trainer, spec: GrowthSpec, grown: ModelConfig, base_stages: list[range], grown_layers: range,
               stack_optimizer: bool) -> RunStart:
    """This rank's stage of the grown model, optimizer state and run position, built from the base Trainer in memory."""
    base = trainer.model_config
    tensors, record = _stage_tensors(trainer, stack_optimizer)
    sources = layer_sources(spec, base.num_layers)
    wanted = {sources[t] for t in grown_layers if sources[t] is not None}
    layers = exchange_layers(tensors, base, base_stages, wanted)
    weights, optimizer_params = {}, {}
    step = max((entry["step"] for entry in record["params"].values()), default=0) if record else 0
    for name, tensor in tensors[WEIGHT].items():  # embedding, final norm, head: this stage's own
        if names.split_layer_name(name) is None:
            weights[name] = tensor
            if record is not None and name in record["params"]:
                optimizer_params[name] = record["params"][name]
    for local, target in enumerate(grown_layers):
        source = sources[target]
        if source is None:  # depth:zero / depth:random: a new layer, drawn whole and cut for this tp rank
            new = grow_layer(None, target, grown, spec.growth_operator.fill, spec.seed, base.torch_dtype)
            for suffix, full in new.items():
                weights[names.layer_param_name(local, suffix)] = split_for_tp(
                    names.layer_param_name(target, suffix), full, grown, state.tp_size())[state.tp_rank()]
            continue
        for suffix in names.LAYER_SUFFIXES:
            name = names.layer_param_name(local, suffix)
            weights[name] = layers[source][WEIGHT][suffix].clone()
            if record is not None:
                moments = [layers[source][kind][suffix].clone() for kind in ("exp_avg", "exp_avg_sq")]
                master = layers[source][MASTER][suffix].clone() if MASTER in layers[source] else None
                optimizer_params[name] = param_state(*moments, master, step)
    optimizer = stage_record(optimizer_params, record.get("loss_scaler")) if record is not None else None
    scheduler = trainer.optimization.scheduler.num_steps
    growth = {"operator": spec.operator, "paper_name": spec.growth_operator.paper_name, "factor": spec.factor,
              "layout": spec.depth_layout, "seed": spec.seed, "source": "in-run growth",
              "source_iteration": trainer.progress.iteration, "source_num_layers": base.num_layers}
    return RunStart(weights, optimizer, asdict(trainer.progress), scheduler, growth)
