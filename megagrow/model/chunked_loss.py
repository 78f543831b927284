"""Output head and vocab-parallel cross entropy over chunks of tokens, never all logits at once.

The head's logits are the largest activation of a Llama step: [s * b, vocab / t] in fp32
inside the loss (TinyLlama at s=2048, b=8: 16k tokens x 32000 x 4 bytes = 2 GiB, plus as
much again for the softmax kept for backward). Here the tokens are split into chunks; each
chunk's logits, loss and softmax exist only while that chunk runs, and backward recomputes
them chunk by chunk (megagrow.model.recompute). Peak memory for the head falls to one
chunk's worth, for one extra head matmul per token in backward.

The loss per token equals the unchunked one; the head's weight gradient is the same sum,
accumulated chunk by chunk, so it matches up to floating-point summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megagrow.errors import UserError
from megagrow.model.recompute import recompute
from megagrow.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagrow.parallel.mappings import copy_to_tp_region, gather_from_sequence_parallel_region


def validate_chunk_size(chunk_size: int | None) -> None:
    """Raise UserError for a negative chunk size (None or 0 turn chunking off)."""
    if chunk_size is not None and chunk_size < 0:
        raise UserError(f"--cross-entropy-chunk-size {chunk_size}: give a positive number of tokens, or 0 for off")


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                vocab_size: int) -> torch.Tensor:
    # hidden [n, h], labels [n] -> loss [n]; the logits [n, v/t] live only inside this call.
    return vocab_parallel_cross_entropy(F.linear(hidden, weight, bias), labels, vocab_size)


def chunked_head_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      vocab_size: int, chunk_size: int, sequence_parallel: bool) -> torch.Tensor:
    """Per-token loss [s, b] of the column-parallel head `weight` [v/t, h] on final hidden states
    [s, b, h] (or [s/t, b, h] with sequence parallel) and labels [s, b], `chunk_size` tokens at a time."""
    # The head's input mapping, applied once to the whole (small, [.., h]) input rather than per
    # chunk: its backward then sums the chunks' partial input grads over tp in one collective.
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)  # [s, b, h]
    else:
        hidden = copy_to_tp_region(hidden)
    s, b, h = hidden.shape
    tokens, targets = hidden.reshape(s * b, h), labels.reshape(s * b)
    losses = [recompute(_chunk_loss, tokens[i:i + chunk_size], targets[i:i + chunk_size], weight, bias, vocab_size)
              for i in range(0, s * b, chunk_size)]
    return torch.cat(losses).view(s, b)
