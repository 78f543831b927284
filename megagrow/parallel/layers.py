"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Initialisation: every layer fills the FULL (master) weight from a seeded generator on the CPU
and keeps only its shard, so the same seed gives the same model at any tp. Equivalence tests,
checkpoint resharding and the growth tools depend on that.

Block-partitioned outputs: a ColumnParallelLinear may stack several logical matrices along
its output (fused QKV, fused gate/up). Each block is split over the tp ranks on its own, so a
rank's local weight is [block0 slice; block1 slice; ...] and the full weight is simply the
blocks concatenated, independent of tp. `shard_blocks` and `unshard_blocks` convert between them.

Parameter attributes read by gradient reduction, checkpoints and tests:
    tp_partition_dim   dimension split over tp ranks, or None when replicated
    tp_partition_sizes full sizes of the blocks along that dimension
    sequence_parallel  True when the grad is a partial sum over sequence slices (see
                       `sync_sequence_parallel_grads`)
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megagrow.parallel import state
from megagrow.parallel.mappings import (
    all_gather_tp,
    all_reduce_tp,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    reduce_scatter_tp,
    scatter_to_tp_region,
)

InitMethod = Callable[[torch.Tensor], None]


def derive_seed(seed: int, key: str) -> int:
    """A seed for one named weight: stable across runs, tp sizes, pipeline splits and construction order."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normal_init(std: float, seed: int) -> InitMethod:
    """Fill a tensor in place from N(0, std^2) drawn from a generator seeded with `seed`."""

    def init(weight: torch.Tensor) -> None:
        # A fresh generator per weight: its values depend on its seed alone, never on what
        # other layers drew before it (which differs between pipeline stages).
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std)

    return init


def shard_blocks(full: torch.Tensor, block_sizes: Sequence[int], dim: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's shard of a block-partitioned full tensor: its slice of every block, concatenated."""
    blocks = full.split(list(block_sizes), dim=dim)
    return torch.cat([block.chunk(tp, dim=dim)[rank] for block in blocks], dim=dim)


def unshard_blocks(shards: Sequence[torch.Tensor], block_sizes: Sequence[int], dim: int) -> torch.Tensor:
    """The full tensor from every rank's shard (inverse of `shard_blocks`)."""
    tp = len(shards)
    local_sizes = [size // tp for size in block_sizes]
    per_rank = [shard.split(local_sizes, dim=dim) for shard in shards]
    return torch.cat([torch.cat([per_rank[r][b] for r in range(tp)], dim=dim) for b in range(len(block_sizes))],
                     dim=dim)


def gather_full(tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """All-gather a tp-sharded parameter (or its grad, passed as `tensor`) into the full tensor."""
    dim = getattr(param, "tp_partition_dim", None)
    if dim is None or state.tp_size() == 1:
        return tensor.detach().clone()
    tp = state.tp_size()
    gathered = all_gather_tp(tensor.detach(), dim)
    return unshard_blocks(gathered.chunk(tp, dim=dim), param.tp_partition_sizes, dim)


def sync_sequence_parallel_grads(module: nn.Module, use_main_grad: bool = False) -> None:
    """Sum over tp the grads of replicated parameters that saw only a sequence slice (norm weights, biases).

    With `use_main_grad` the fp32 accumulation buffers of the data-parallel reducer are summed
    instead of `.grad`.
    """
    if state.tp_size() == 1:
        return
    attribute = "main_grad" if use_main_grad else "grad"
    grads = [getattr(p, attribute) for p in module.parameters()
             if getattr(p, "sequence_parallel", False) and getattr(p, attribute, None) is not None]
    if not grads:
        return
    # One collective for all of them: these are small vectors, latency dominates.
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_tp(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _make_sharded_parameter(shape: Sequence[int], block_sizes: Sequence[int], dim: int, init_method: InitMethod,
                            dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    tp, rank = state.tp_size(), state.tp_rank()
    for size in block_sizes:
        if size % tp:
            raise ValueError(f"partition of size {size} is not divisible by tensor-parallel size {tp}")
    # Drawn in float32 on the CPU so the values do not depend on device or params dtype.
    full = torch.empty(tuple(shape), dtype=torch.float32)
    init_method(full)
    shard = shard_blocks(full, block_sizes, dim, tp, rank)
    param = nn.Parameter(shard.to(device=device, dtype=dtype).contiguous())
    param.tp_partition_dim = dim
    param.tp_partition_sizes = tuple(block_sizes)
    return param


def _make_bias(size: int, partition_sizes: Sequence[int] | None, dtype: torch.dtype,
               device: torch.device | str | None, sequence_parallel: bool) -> nn.Parameter:
    if partition_sizes is None:
        param = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        param.tp_partition_dim = None
        param.sequence_parallel = sequence_parallel
        return param
    return _make_sharded_parameter((size,), partition_sizes, 0, lambda t: t.zero_(), dtype, device)


class _SequenceGatheredLinear(torch.autograd.Function):
    # fwd: x [s/t, b, in], weight [out/t, in], bias [out/t] -> y [s, b, out/t]
    # bwd: grad_y [s, b, out/t] -> grad_x [s/t, b, in] (reduce-scattered), grad_weight [out/t, in], grad_bias [out/t]
    # Keeps only the local slice of x and all-gathers it again in backward: the gathered
    # [s, b, in] input is the activation sequence parallelism exists to avoid storing.
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(all_gather_tp(x, 0), weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        full_x = all_gather_tp(x, 0)
        grad_x = reduce_scatter_tp(grad_y.matmul(weight), 0)
        grad_weight = grad_y.reshape(-1, grad_y.size(-1)).t().matmul(full_x.reshape(-1, full_x.size(-1)))
        grad_bias = grad_y.sum(dim=(0, 1)) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A's output rows split over tp ranks: [*, in] -> [*, out/t] (or [*, out] if gathered).

    With sequence_parallel the input arrives as [s/t, b, in] and is all-gathered along the
    sequence first. `output_partition_sizes` splits the output into blocks sharded separately
    (see the module docstring); `gather_output` needs a single block.
    """

    def __init__(self, input_size: int, output_size: int, *, output_partition_sizes: Sequence[int] | None = None,
                 bias: bool = False, gather_output: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, skip_weight: bool = False):
        super().__init__()
        partition_sizes = tuple(output_partition_sizes or (output_size,))
        if sum(partition_sizes) != output_size:
            raise ValueError(f"output partitions {partition_sizes} do not add up to output_size {output_size}")
        if gather_output and len(partition_sizes) > 1:
            raise ValueError("gather_output needs a single output partition: gathered blocks would interleave")
        self.input_size, self.output_size = input_size, output_size
        self.output_partition_sizes = partition_sizes
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        init_method = init_method or normal_init(0.02, 0)
        # skip_weight: the weight is passed to forward (an output head tied to the embedding).
        self.weight = None if skip_weight else _make_sharded_parameter(
            (output_size, input_size), partition_sizes, 0, init_method, params_dtype, device)
        self.bias = _make_bias(output_size, partition_sizes, params_dtype, device, False) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """[s, b, in] (or [s/t, b, in] with sequence parallel) -> [s, b, out/t] (or [s, b, out] if gathered)."""
        weight = self.weight if weight is None else weight
        if self.sequence_parallel:
            y = _SequenceGatheredLinear.apply(x, weight, self.bias)
        else:
            y = F.linear(copy_to_tp_region(x), weight, self.bias)
        return gather_from_tp_region(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, partitions={self.output_partition_sizes}, "
                f"tp={state.tp_size()}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A^T with A's input columns split over tp ranks: [*, in/t] -> [*, out], partial sums reduced.

    With sequence_parallel the output is reduce-scattered along the sequence to [s/t, b, out],
    which requires the input to be already split (input_is_parallel).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, input_is_parallel: bool = False,
                 sequence_parallel: bool = False, init_method: InitMethod | None = None,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel RowParallelLinear needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        init_method = init_method or normal_init(0.02, 0)
        self.weight = _make_sharded_parameter((output_size, input_size), (input_size,), 1, init_method,
                                              params_dtype, device)
        # Added after the reduction, so it is replicated, not sharded.
        self.bias = _make_bias(output_size, None, params_dtype, device, sequence_parallel) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, in/t] (or [s, b, in] to be scattered) -> [s, b, out] (or [s/t, b, out] with sequence parallel)."""
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence_parallel_region(y) if self.sequence_parallel else reduce_from_tp_region(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={state.tp_size()}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table with vocabulary rows split over tp ranks; each rank looks up the ids it owns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        tp = state.tp_size()
        if num_embeddings % tp:
            raise ValueError(f"vocabulary of {num_embeddings} rows is not divisible by tensor-parallel size {tp}; "
                             f"pad it with megagrow.config.padded_vocab_size")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        rows_per_rank = num_embeddings // tp
        self.vocab_start = state.tp_rank() * rows_per_rank
        self.vocab_end = self.vocab_start + rows_per_rank
        init_method = init_method or normal_init(0.02, 0)
        self.weight = _make_sharded_parameter((num_embeddings, embedding_dim), (num_embeddings,), 0, init_method,
                                              params_dtype, device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[s, b] token ids -> [s, b, h] embeddings (or [s/t, b, h] with sequence parallel)."""
        if state.tp_size() == 1:
            return F.embedding(token_ids, self.weight)
        foreign = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(foreign, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial)
        return reduce_from_tp_region(partial)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={state.tp_size()}"
