"""How megagrow's optimizer state is laid out in its checkpoints (MixedPrecisionOptimizer.state_dict).

    optimizer.optimizer   torch AdamW state_dict over the stage's parameters (fragments with
                          the distributed optimizer): one param group per weight-decay choice,
                          matrices first, then vectors, each listing its parameters in reverse
                          registration order (the order the gradient reducer buckets them in)
    optimizer.masters     the fp32 master of each parameter in reverse registration order;
                          None where the fp32 parameter is its own master
    optimizer.loss_scaler fp16 loss scale state, or None

Tools that rewrite optimizer state offline (growth, upgrades) find a parameter's entries by
name through `adam_param_order`.
"""

from __future__ import annotations

import torch

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def uses_weight_decay(param: torch.Tensor) -> bool:
    """Matrices decay; 1-D tensors (biases, norm gains) do not."""
    # Decaying norm gains pulls them toward zero, which only hurts, so Megatron (and
    # Llama recipes) exempt every 1-D parameter.
    return param.ndim >= 2


def adam_param_order(model: dict[str, torch.Tensor]) -> list[list[str]]:
    """A stage's parameter names as its AdamW state indexes them: per param group, in index order."""
    fragments = list(reversed(list(model)))  # the reducer buckets parameters in reverse order
    decayed = [name for name in fragments if uses_weight_decay(model[name])]
    not_decayed = [name for name in fragments if not uses_weight_decay(model[name])]
    return [group for group in (decayed, not_decayed) if group]


def adam_index(model: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each parameter's index in the AdamW state of a stage holding `model`."""
    return {name: index for index, name in enumerate(name for group in adam_param_order(model) for name in group)}


def master_slot(model: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each parameter's position in the `masters` list of a stage holding `model`."""
    return {name: slot for slot, name in enumerate(reversed(list(model)))}
