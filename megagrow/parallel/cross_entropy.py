"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

Each rank holds logits for its contiguous vocabulary slice [start, end). Only three
per-token scalars cross ranks: the max logit (for a stable softmax), the sum of exponentials,
and the target's logit (non-zero on the one rank that owns the target). The full-vocabulary
logits are never gathered, which is what lets the last pipeline stage compute the loss cheaply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.distributed as dist

from megagrow.parallel import state
from megagrow.parallel.mappings import all_reduce_tp


class _VocabParallelCrossEntropy(torch.autograd.Function):
    # fwd: logits [s, b, v/t], target [s, b] -> loss [s, b]; bwd: grad [s, b] -> grad of logits [s, b, v/t]
    @staticmethod
    def forward(ctx, logits, target, vocab_size):
        local_vocab = logits.size(-1)
        start = state.tp_rank() * local_vocab
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        real_columns = None if vocab_size is None else vocab_size - start
        if real_columns is not None and real_columns < local_vocab:
            # Padding rows of the output head must never be predicted: -inf gives them zero
            # probability here and zero gradient in backward.
            logits = logits.clone()
            logits[..., max(real_columns, 0):] = float("-inf")

        max_logit = logits.max(dim=-1).values
        all_reduce_tp(max_logit, op=dist.ReduceOp.MAX)
        shifted = logits - max_logit.unsqueeze(-1)

        foreign = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(foreign, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(foreign, 0.0)
        all_reduce_tp(target_logit)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce_tp(sum_exp)

        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, foreign)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, foreign = ctx.saved_tensors
        # d loss / d logit_j = softmax_j - [j == target], only the owning rank subtracts the one-hot.
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~foreign).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss from vocab-sharded logits [s, b, v/t] and targets [s, b]; columns >= vocab_size are padding."""
    if state.tp_size() == 1:
        # Nothing to reduce across ranks: torch's fused log-softmax kernel is faster than
        # the explicit max / exp / sum the sharded version needs (benchmarks/RESULTS.md).
        real = logits if vocab_size is None else logits[..., :vocab_size]
        return F.cross_entropy(real.float().flatten(0, -2), target.flatten(), reduction="none").view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size)
