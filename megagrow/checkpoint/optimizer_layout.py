"""How optimizer state is kept in megagrow's checkpoints: in model space, per parameter, whatever the optimizer's layout.

Every backend (megagrow's optimizer with or without --use-distributed-optimizer, DeepSpeed
at any ZeRO stage) gathers its Adam state into the shape of the parameters before saving,
and scatters it back into its own layout when loading. So one checkpoint resumes under any
data-parallel size and any backend, the optimizer state reshards across tp/pp like the
weights, and growth stacks Adam moments exactly as it stacks the weights.

A stage's record (the `optimizer` entry of megagrow's record in a torch-format shard):

    params        {stage parameter name: {exp_avg, exp_avg_sq: tensors shaped as the
                   parameter's tp shard (fp32); master: its fp32 master, or None where the
                   fp32 parameter is its own master; step: Adam steps taken}}; a parameter
                   the optimizer never stepped is absent (its moments start at zero)
    loss_scaler   fp16 dynamic loss scale state, or None

torch_dist checkpoints keep the tensors as megatron-core's non-distributed optimizer does:
chunks of `optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.{key}`, sharded like the parameter
`key` (megagrow/checkpoint/torch_dist.py), and in common.pt its `optimizer` entry (the common
step and the two param groups, megagrow_optimizer_common), so Megatron-LM loads the Adam state
of a megagrow run and megagrow loads Megatron-LM's.
"""

from __future__ import annotations

import torch

EXP_AVG, EXP_AVG_SQ, MASTER = "exp_avg", "exp_avg_sq", "master"
ADAM_MOMENTS = (EXP_AVG, EXP_AVG_SQ)
STATE_KINDS = (EXP_AVG, EXP_AVG_SQ, MASTER)  # the per-parameter tensors, in the order they are written
WEIGHT = "weight"  # the parameter itself, read through the same paths as the state kinds


def uses_weight_decay(param: torch.Tensor) -> bool:
    """Matrices decay; 1-D tensors (biases, norm gains) do not."""
    # Decaying norm gains pulls them toward zero, which only hurts, so Megatron (and
    # Llama recipes) exempt every 1-D parameter.
    return param.ndim >= 2


def param_state(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, master: torch.Tensor | None, step: int) -> dict:
    """One parameter's record."""
    return {EXP_AVG: exp_avg, EXP_AVG_SQ: exp_avg_sq, MASTER: master, "step": int(step)}


def stage_record(params: dict[str, dict], loss_scaler: dict | None) -> dict:
    """A stage's optimizer record from its parameters' records (names as the stage registers them)."""
    return {"params": params, "loss_scaler": loss_scaler}


# torch_dist names of each kind, the one written first: a master is megatron-core's `fp32_param`
# (its non-distributed mixed-precision optimizer); megagrow wrote `master` before 2026-12-03, and
# megatron-core's fully reshardable distributed optimizer writes `param`.
_DIST_NAMES = {EXP_AVG: ("exp_avg",), EXP_AVG_SQ: ("exp_avg_sq",), MASTER: ("fp32_param", "master", "param")}


def dist_state_key(kind: str, key: str) -> str:
    """torch_dist key of state `kind` (exp_avg, exp_avg_sq, master) of the parameter saved under `key`."""
    return f"optimizer.state.{_DIST_NAMES[kind][0]}.{key}"


def dist_state_keys(kind: str, key: str) -> list[str]:
    """Every torch_dist key state `kind` of parameter `key` may be saved under, the current name first."""
    return [f"optimizer.state.{name}.{key}" for name in _DIST_NAMES[kind]]


def megatron_param_groups(*, lr: float, max_lr: float, min_lr: float, weight_decay: float, betas: tuple,
                          eps: float, step: int) -> list[dict]:
    """megatron-core's two default param groups (matrices with weight decay, then 1-D parameters without) as its
    checkpoints hold them: matched on load by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)."""
    def group(wd_mult: float) -> dict:
        return {"is_expert_parallel": False, "default_config": True, "wd_mult": wd_mult, "lr_mult": 1.0,
                "is_decoupled_lr": False, "max_lr": max_lr, "min_lr": min_lr, "lr": lr, "betas": tuple(betas),
                "eps": eps, "weight_decay": weight_decay * wd_mult, "amsgrad": False, "maximize": False,
                "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                "decoupled_weight_decay": True,
                # torch's AdamW ignores these two; apex's and Transformer Engine's FusedAdam read them from the group.
                "bias_correction": True, "step": step}
    return [group(1.0), group(0.0)]


def megatron_optimizer_common(step: int, groups: list[dict], mixed_precision: bool) -> dict:
    """common.pt's `optimizer` entry as megatron-core's non-distributed optimizer saves it.

    `groups` are the two param groups' settings in megatron-core's order (decayed, then not);
    a mixed-precision optimizer nests its torch optimizer's state under `optimizer`.
    """
    record = {"state": {"common_step": torch.tensor(float(step))}, "param_groups": groups}
    return {"optimizer": record} if mixed_precision else record


def megatron_common_step(entry: dict | None) -> int | None:
    """Adam steps recorded in common.pt's `optimizer` entry, in any of megatron-core's layouts (None: none)."""
    if not isinstance(entry, dict):
        return None
    inner = entry.get("optimizer", entry)
    step = (inner.get("state") or {}).get("common_step")
    if step is None:  # the distributed optimizer keeps it in its param groups
        steps = [group.get("step") for group in inner.get("param_groups", []) if group.get("step") is not None]
        step = max(steps) if steps else None
    return None if step is None else int(step)
