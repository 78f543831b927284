"""RMSNorm: x / rms(x) * weight, with apex's fused kernel on CUDA when available."""

from __future__ import annotations

import torch
from torch import nn

from megagrow.model.backends import APEX_RMSNORM, norm_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm over the last dimension; statistics in float32 whatever the input dtype."""
    x32 = x.float()
    normalized = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    # Cast back before scaling, as HF Llama does, so converted checkpoints match bit for bit in bf16.
    return normalized.to(x.dtype) * weight


class RMSNorm(nn.Module):
    """Root-mean-square norm over the hidden dimension with a learned per-channel scale."""

    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 force_torch_kernels: bool | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.weight.tp_partition_dim = None
        # Under sequence parallelism each rank normalises only its sequence slice, so its
        # grad is partial and must be summed over tp (sync_sequence_parallel_grads).
        self.weight.sequence_parallel = sequence_parallel
        self.force_torch_kernels = force_torch_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., h] -> [..., h]."""
        if norm_backend(x.device, self.force_torch_kernels) == APEX_RMSNORM:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
