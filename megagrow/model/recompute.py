"""Activation recomputation: trade a second forward pass for the activations it would store.

Granularities, as Megatron's --recompute-granularity:

    full       each decoder layer keeps only its input; everything inside is recomputed in
               backward. Activation memory per layer drops from tens of [s, b, h] tensors to
               one, for about one extra forward pass (~33% more compute).
    selective  only the core attention (softmax(q k^T) v) is recomputed. With the SDPA math
               kernel that is where the [b, n, s, s] scores live, the largest activations by
               far at long sequences, and they are cheap to recompute. flash-attn already
               keeps no scores, so there selective recompute saves little.

Nothing here draws random numbers (Llama pre-training uses no dropout), so the recomputed
values equal the first ones and gradients are unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from megagrow.errors import UserError

FULL = "full"
SELECTIVE = "selective"
GRANULARITIES = (FULL, SELECTIVE)


def validate_granularity(granularity: str | None) -> None:
    """Raise UserError unless `granularity` is None, 'full' or 'selective'."""
    if granularity is not None and granularity not in GRANULARITIES:
        raise UserError(f"--recompute-granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")


def recompute(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """fn(*args), storing only its inputs for backward, which runs fn again to get the rest."""
    if not torch.is_grad_enabled():
        return fn(*args)  # nothing is stored without autograd, so there is nothing to save
    # Non-reentrant: works with inputs that do not require grad and with torch.compile, and
    # collectives inside fn are simply issued again in backward on every rank in the same order.
    return checkpoint(fn, *args, use_reentrant=False)
