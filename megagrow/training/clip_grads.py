"""Global gradient norm across tensor, pipeline and data parallel ranks, and clipping by it.

Each gradient element must be counted exactly once in the norm: parameters replicated
over tensor-parallel ranks (norm gains, which carry `tp_partition_dim = None`) count on
tp rank 0 only; pipeline stages hold disjoint parameters; data-parallel replicas hold the
same reduced gradient, unless the distributed optimizer shards it, in which case each dp
rank contributes its own slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagrow.parallel import state


def counts_in_norm(param: torch.nn.Parameter) -> bool:
    """Whether this rank's copy of `param` contributes to the global norm (tp replicas count once)."""
    replicated = getattr(param, "tp_partition_dim", None) is None
    return not (replicated and state.tp_rank() != 0)


def global_grad_norm(grads_of_params: list[tuple[torch.nn.Parameter, torch.Tensor]], sharded_over_dp: bool) -> float:
    """L2 norm of all gradients of the model, over every rank; (param, grad) pairs name what each grad belongs to."""
    device = grads_of_params[0][1].device if grads_of_params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param, grad in grads_of_params:
        if counts_in_norm(param):
            total += grad.float().pow(2).sum()
    groups = [state.tp_group(), state.pp_group()]
    if sharded_over_dp:
        groups.append(state.dp_group())
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            # [] -> [] summed over the group.
            dist.all_reduce(total, group=group)
    return float(total.sqrt())


def clip_by_norm(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale gradients in place so their global norm is at most max_norm (max_norm <= 0: no clipping)."""
    if max_norm <= 0:
        return
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        torch._foreach_mul_(grads, coefficient)
