"""Activation recomputation: trade a second forward pass for the activations it would store.

Granularities, as Megatron's --recompute-granularity:

    full       each decoder layer keeps only its input; everything inside is recomputed in
               backward. Activation memory per layer drops from tens of [s, b, h] tensors to
               one, for about one extra forward pass (~33% more compute).
    selective  only the core attention (softmax(q k^T) v) is recomputed. With the SDPA math
               kernel that is where the [b, n, s, s] scores live, the largest activations by
               far at long sequences, and they are cheap to recompute. flash-attn already
               keeps no scores, so there selective recompute saves little.

With full granularity, --recompute-method chooses which layers (Megatron's meanings):

    uniform    the stage's layers in consecutive chunks of --recompute-num-layers; each chunk
               keeps only its input and is recomputed as one (fewer stored inputs, the same
               extra forward). The last chunk may be shorter.
    block      only the first --recompute-num-layers layers of each pipeline stage are
               recomputed (each keeps its input); the rest store their activations, using
               the memory a stage has left instead of recomputing everything.

No method means uniform chunks of one layer. Nothing here draws random numbers (Llama pre-training uses no dropout), so the recomputed
values equal the first ones and gradients are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from megagrow.errors import UserError

FULL = "full"
SELECTIVE = "selective"
GRANULARITIES = (FULL, SELECTIVE)
UNIFORM = "uniform"
BLOCK = "block"
METHODS = (UNIFORM, BLOCK)


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


@dataclass(frozen=True)
class LayerRecompute:
    """Which decoder layers full recomputation covers: chunks of `num_layers` (uniform) or the first `num_layers` (block)."""

    method: str = UNIFORM
    num_layers: int = 1

    @classmethod
    def from_flags(cls, granularity: str | None, method: str | None, num_layers: int | None) -> LayerRecompute | None:
        """The plan for --recompute-granularity/-method/-num-layers; None when layers are not recomputed whole."""
        validate_granularity(granularity)
        if method is not None and method not in METHODS:
            raise UserError(f"--recompute-method {method!r}: choose one of {', '.join(METHODS)}")
        if num_layers is not None and num_layers < 1:
            raise UserError(f"--recompute-num-layers must be positive, got {num_layers}")
        if granularity != FULL:
            if method is not None or num_layers is not None:
                given = "--recompute-method" if method is not None else "--recompute-num-layers"
                raise UserError(f"{given} applies to --recompute-granularity full only (got "
                                f"{granularity or 'no granularity'}); add --recompute-granularity full or drop it")
            return None
        return cls(method or UNIFORM, num_layers or 1)

    def run(self, layers: Sequence[Callable[..., torch.Tensor]], x: torch.Tensor, *args) -> torch.Tensor:
        """x through `layers` in order (each called as layer(x, *args)), recomputing the ones this plan covers."""
        if self.method == BLOCK:
            for index, layer in enumerate(layers):
                x = recompute(layer, x, *args) if index < self.num_layers else layer(x, *args)
            return x
        for start in range(0, len(layers), self.num_layers):
            x = recompute(_chained(layers[start:start + self.num_layers]), x, *args)
        return x


def _chained(layers: Sequence[Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args) -> torch.Tensor:
        for layer in layers:
            x = layer(x, *args)
        return x

    return forward
