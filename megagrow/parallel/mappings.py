"""Autograd-aware communication over the tensor-parallel group.

Each op is a torch.autograd.Function whose backward is the adjoint collective of its forward
(identity <-> all-reduce, split <-> all-gather, all-gather <-> reduce-scatter), so the model
code states where activations change distribution and autograd does the rest.

Shapes use t = tp size, [s, b, h] activations (sequence first, as the model uses), h/t the
last dimension split over ranks and s/t the first. With one tp rank every op is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagrow.parallel import state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if state.tp_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=state.tp_group())
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = state.tp_size()
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"cannot split dimension {dim} of size {x.size(dim)} over {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[state.tp_rank()].contiguous()


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = state.tp_size()
    if world == 1:
        return x
    x = x.contiguous()
    group = state.tp_group()
    if dim == 0 and dist.get_backend(group) == dist.Backend.NCCL:
        # Sequence-parallel gathers: NCCL writes straight into one buffer, no concatenation.
        out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = state.tp_size()
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.size(dim)} over {world} ranks")
    group = state.tp_group()
    if dim == 0 and dist.get_backend(group) == dist.Backend.NCCL:
        out = torch.empty((x.size(0) // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    # gloo has no reduce-scatter: all-reduce and keep this rank's slice (same result, more traffic).
    return _split(_all_reduce(x.clone()), dim)


class _CopyToTensorParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h] -> [s, b, h] (identity); bwd: [s, b, h] partial grads -> all-reduced [s, b, h]
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h] partial sums -> all-reduced [s, b, h]; bwd: [s, b, h] -> [s, b, h] (identity)
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h] -> [s, b, h/t] (this rank's slice); bwd: [s, b, h/t] -> all-gathered [s, b, h]
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1)


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h/t] -> all-gathered [s, b, h]; bwd: [s, b, h] -> [s, b, h/t] (this rank's slice)
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h] -> [s/t, b, h] (this rank's slice); bwd: [s/t, b, h] -> all-gathered [s, b, h]
    @staticmethod
    def forward(ctx, x):
        return _split(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    # fwd: [s/t, b, h] -> all-gathered [s, b, h];
    # bwd: [s, b, h] -> [s/t, b, h], reduce-scattered when each rank's grad is a partial sum
    # (the gathered tensor fed a tensor-parallel matmul), else just this rank's slice.
    @staticmethod
    def forward(ctx, x, grad_is_partial):
        ctx.grad_is_partial = grad_is_partial
        return _all_gather(x, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, 0), None
        return _split(grad, 0), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    # fwd: [s, b, h] partial sums -> reduce-scattered [s/t, b, h]; bwd: [s/t, b, h] -> all-gathered [s, b, h]
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0)


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: identity forward, all-reduce backward."""
    return _CopyToTensorParallelRegion.apply(x)


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward, identity backward."""
    return _ReduceFromTensorParallelRegion.apply(x)


def scatter_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; all-gather backward."""
    return _ScatterToTensorParallelRegion.apply(x)


def gather_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dimension; backward keeps this rank's slice."""
    return _GatherFromTensorParallelRegion.apply(x)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the sequence (first) dimension; all-gather backward."""
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the sequence dimension; backward reduce-scatters (or slices if grads are already full)."""
    return _GatherFromSequenceParallelRegion.apply(x, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence slice; all-gather backward."""
    return _ReduceScatterToSequenceParallelRegion.apply(x)


def all_reduce_tp(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the tp group, outside autograd (for statistics such as softmax maxima)."""
    if state.tp_size() > 1:
        dist.all_reduce(x, op=op, group=state.tp_group())
    return x


def all_gather_tp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """All-gather along `dim` over the tp group, outside autograd (for checkpoints and tests)."""
    return _all_gather(x, dim)


def reduce_scatter_tp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over the tp group and keep this rank's slice of `dim`, outside autograd."""
    return _reduce_scatter(x, dim)
