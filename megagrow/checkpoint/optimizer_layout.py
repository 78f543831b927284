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

torch_dist checkpoints keep the tensors as chunks of `optimizer.state.{kind}.{key}`, sharded
like the parameter `key` (megagrow/checkpoint/torch_dist.py), and the steps in common.pt.
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


def dist_state_key(kind: str, key: str) -> str:
    """torch_dist key of state `kind` (exp_avg, exp_avg_sq, master) of the parameter saved under `key`."""
    return f"optimizer.state.{kind}.{key}"
