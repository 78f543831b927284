"""Rotary position embeddings (RoPE) in the rotate-half convention.

Channel i of a head is paired with channel i + d/2 (not with its neighbour 2i+1), which is the
convention of HF Llama: q/k projection weights convert between the two codebases with no
permutation of rows. Frequencies: theta^(-2i/d) for i < d/2, repeated for both halves.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of the last dimension
    # (signs of the sin terms swapped for the inverse rotation), in float32 or wider. One full
    # and two half-size multiplies and two in-place half updates: the textbook
    # x cos + cat(-x2, x1) sin adds a neg, a cat and a full add (and as many again in
    # backward), yet rounds every product and sum exactly as this does, so results are equal.
    half = x.size(-1) // 2
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    out = x * cos  # the broadcast shape of x and cos
    x2_sin = x[..., half:] * sin[..., :half]
    x1_sin = x[..., :half] * sin[..., half:]
    if inverse:
        out[..., :half].add_(x2_sin)
        out[..., half:].sub_(x1_sin)
    else:
        out[..., :half].sub_(x2_sin)
        out[..., half:].add_(x1_sin)
    return out


class _ApplyRotary(torch.autograd.Function):
    # A rotation's transpose is the rotation by -angle: backward rotates the gradient back,
    # and nothing but the (shared, constant) tables is saved for it.
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return _rotate(x, cos, sin, inverse=False).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        grad_x = _rotate(grad_out, cos, sin, inverse=True).sum_to_size(ctx.x_shape)
        return grad_x.to(ctx.x_dtype), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [s, b, n, d] (or [s, b, g, n, d]) by cos/sin [s, b or 1, 1, d] (or [s, b or 1, 1, 1, d]); tables get no grad."""
    return _ApplyRotary.apply(x, cos, sin)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for positions [0, max_positions), looked up per token."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        # Plain tensors, not buffers: model.to(torch.bfloat16) must not round the angles (at
        # position 4000 bf16 cos/sin would be visibly wrong). One float32 copy per device.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[device] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._tables[device]

    def forward(self, seq_length: int, position_ids: torch.Tensor | None = None,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [s, b or 1, 1, d] for position_ids [b, s] (default 0..s-1 for every sequence)."""
        cos, sin = self._cos_sin(torch.device(device))
        if position_ids is None:
            if seq_length > self.max_positions:
                raise ValueError(f"sequence of {seq_length} tokens exceeds max_position_embeddings "
                                 f"{self.max_positions}")
            return cos[:seq_length, None, None, :], sin[:seq_length, None, None, :]
        positions = position_ids.t()
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta}"
