"""A DeepSpeed engine's weights and Adam state in model space, so DeepSpeed runs save and load megagrow's checkpoints.

DeepSpeed keeps the fp32 masters and Adam moments of ZeRO 1/2/3 in flat partitions over the
data-parallel ranks. Its `safe_get_full_*` / `safe_set_full_*` functions (deepspeed.utils)
gather a parameter's full tensor from them and scatter one back, collectively; megagrow
uses them to turn the engine's state into the per-parameter record of
megagrow/checkpoint/optimizer_layout.py and back. Without a ZeRO wrapper (stage 0, fp32)
the torch optimizer's own state is read.

Two DeepSpeed behaviours are worked around here, both in 0.19:
- ZeRO 1/2 link each parameter to its slice of the optimizer state after the first step of
  the managed path; with megagrow's unmanaged accumulation the link is made while the state
  is still empty, so `safe_get_full_optimizer_state` finds no `exp_avg`. The links are made
  again (`_lazy_init_hp_params_optimizer_state`) once the state exists.
- torch creates Adam state lazily, at the first step; a fresh engine has none to scatter
  into. Before loading, every flat partition gets the zeros torch's first step would give it.
"""

from __future__ import annotations

import torch

from megagrow.checkpoint.optimizer_layout import EXP_AVG, EXP_AVG_SQ, param_state, stage_record
from megagrow.errors import UserError

MOMENTS = (EXP_AVG, EXP_AVG_SQ)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _flat_partitions(engine) -> list[torch.Tensor]:
    wrapper, inner = engine.optimizer, inner_optimizer(engine.optimizer)
    flats = [p for group in inner.param_groups for p in group["params"]]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        flats += [p for p in getattr(wrapper, name, []) if all(p is not q for q in flats)]
    return flats


def _relink(engine) -> None:
    wrapper = engine.optimizer
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _has_partitions(param) -> bool:
    # A parameter with no slice on this rank has _hp_mapping None, and still takes part in the gather.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _unsupported(engine) -> UserError:
    return UserError(f"DeepSpeed's {type(engine.optimizer).__name__} keeps its optimizer state where megagrow cannot "
                     f"read it per parameter (fp16 without ZeRO); use --zero-stage 1 or higher, or --bf16")


def model_space_record(engine, model) -> dict:
    """The stage's Adam state by parameter name (collective over the data-parallel ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = inner_optimizer(engine.optimizer)
    steps = [int(state["step"]) for state in inner.state.values() if "step" in state]
    if not steps:
        return stage_record({}, None)  # never stepped: a fresh optimizer
    _relink(engine)
    records = {}
    for name, param in model.named_parameters():
        if _has_partitions(param):
            moments = [safe_get_full_optimizer_state(param, kind) for kind in MOMENTS]
            master = safe_get_full_fp32_param(param)
        elif param in inner.state:
            state = inner.state[param]
            moments, master = [state[kind] for kind in MOMENTS], None
        else:
            raise _unsupported(engine)
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 leaves only its partition in the parameter
        master = None if param.dtype == torch.float32 or master is None else master.detach().cpu().view(shape)
        records[name] = param_state(*(m.detach().cpu().reshape(shape).clone() for m in moments), master, max(steps))
    return stage_record(records, None)


@torch.no_grad()
def load_model_space_record(engine, model, record: dict) -> None:
    """Scatter a model-space record into the engine's partitions (collective over the data-parallel ranks)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not record["params"]:
        return
    inner = inner_optimizer(engine.optimizer)
    step = max(int(state["step"]) for state in record["params"].values())
    for flat in _flat_partitions(engine):
        if EXP_AVG not in inner.state.get(flat, {}):
            inner.state[flat] = {"step": torch.tensor(0.0), EXP_AVG: torch.zeros_like(flat),
                                 EXP_AVG_SQ: torch.zeros_like(flat)}
    _relink(engine)
    params = dict(model.named_parameters())
    for name, state in record["params"].items():
        param = params[name]
        if _has_partitions(param):
            for kind in MOMENTS:
                safe_set_full_optimizer_state(param, state[kind].to(torch.float32), kind)
            if state["master"] is not None:
                safe_set_full_fp32_param(param, state["master"].to(torch.float32))
        elif param in inner.state:
            for kind in MOMENTS:
                inner.state[param][kind].copy_(state[kind].view_as(inner.state[param][kind]))
        else:
            raise _unsupported(engine)
    for state in inner.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step))


def stage_weights(model, zero_stage: int) -> dict[str, torch.Tensor]:
    """The stage's full (tp-sharded) weights; ZeRO-3's partitioned ones gathered a parameter at a time (collective)."""
    if zero_stage < 3:
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    import deepspeed

    weights = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            weights[name] = param.detach().to("cpu", copy=True)
    return weights
