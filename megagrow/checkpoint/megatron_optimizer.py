"""Megatron-LM's torch-format optimizer record, read per parameter.

A Megatron-LM `model_optim_rng.pt` of a run without the distributed optimizer holds its
optimizer's `state_dict()` under `optimizer`: torch Adam's own state dict (nested once more
under `optimizer`, beside `fp32_from_fp16_params`, with bf16/fp16). Its parameters are numbered
across megatron-core's param groups in group order: the group with `wd_mult` 1 holds the
matrices, the one with `wd_mult` 0 the 1-D parameters (norm gains), each in the model's
parameter order, which is the order of the rank's `model` state dict. The distributed
optimizer's torch format keeps no per-parameter state here (its `distrib_optim.pt` holds
gradient-buffer ranges) and is not read.
"""

from __future__ import annotations

import torch

from megagrow.checkpoint.optimizer_layout import param_state, uses_weight_decay
from megagrow.errors import UserError


def _torch_optimizer(record: dict | None) -> dict | None:
    if not isinstance(record, dict):
        return None
    inner = record.get("optimizer", record)
    return inner if isinstance(inner, dict) and "param_groups" in inner else None


def holds_adam_state(record: dict | None) -> bool:
    """Whether a Megatron-LM torch-format `optimizer` record holds per-parameter Adam state."""
    inner = _torch_optimizer(record)
    return inner is not None and bool(inner.get("state"))


def adam_steps(record: dict) -> int:
    """Adam steps recorded in a Megatron-LM torch-format `optimizer` record."""
    steps = [state["step"] for state in _torch_optimizer(record)["state"].values() if "step" in state]
    return int(max(float(step) for step in steps)) if steps else 0


def adam_state_by_name(record: dict, model: dict[str, torch.Tensor], where: str) -> dict[str, dict]:
    """Per-parameter records (exp_avg, exp_avg_sq, master, step) keyed as `model`, a rank's model state in its saved
    order (canonical names), from that rank's Megatron-LM torch-format `optimizer` record."""
    inner = _torch_optimizer(record)
    masters = record.get("fp32_from_fp16_params") if inner is not record else None
    result = {}
    for g, group in enumerate(inner["param_groups"]):
        matrices = float(group.get("wd_mult", 1.0)) != 0.0
        members = [name for name, tensor in model.items() if uses_weight_decay(tensor) == matrices]
        indices = group["params"]
        if len(indices) != len(members):
            raise UserError(f"{where}: its optimizer group {g} (wd_mult {group.get('wd_mult')}) holds {len(indices)} "
                            f"parameters, the model has {len(members)} of that kind; the optimizer was built with "
                            f"other groups (e.g. --decoupled-lr): pass --no-load-optim")
        for position, (index, name) in enumerate(zip(indices, members)):
            state = inner["state"].get(index)
            if state is None:
                continue  # never stepped: its moments start at zero
            master = masters[g][position] if masters else None
            result[name] = param_state(state["exp_avg"].float(), state["exp_avg_sq"].float(),
                                       None if master is None else master.float(), int(float(state["step"])))
    return result
