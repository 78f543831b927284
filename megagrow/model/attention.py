"""Causal grouped-query self-attention with heads split over tensor-parallel ranks.

Fused QKV layout, megatron-core's (`linear_qkv`): the rows are grouped per query group g
(one kv head and the n_q/n_kv query heads that read it), each group holding its query heads,
then its key head, then its value head:

    full weight   [q heads of g=0; k_0; v_0; q heads of g=1; k_1; v_1; ...]   [(n_q + 2 n_kv) d, h]
    rank r holds  the groups r*n_kv/t .. (r+1)*n_kv/t - 1, i.e. a plain contiguous slice of rows

Query head i belongs to group i // (n_q/n_kv), as in HF Llama, so a rank's query heads read
exactly the kv heads it holds, and HF's q_proj/k_proj/v_proj map onto the groups by
interleaving rows (megagrow.checkpoint.tp_layout). Both n_q and n_kv must be divisible by tp;
kv heads are never replicated. Names follow megatron-core: `linear_qkv`, `linear_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagrow.config import ModelConfig
from megagrow.model.backends import FLASH_ATTENTION, attention_backend
from megagrow.model.recompute import recompute
from megagrow.model.rope import apply_rotary
from megagrow.parallel import state
from megagrow.parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear


def _cpu_sdpa_takes_gqa() -> bool:
    # SDPA's enable_gqa (torch >= 2.5) lets query heads read their kv head in place, but only
    # kernels built for it do so; others leave it to SDPA's math path, which materialises
    # every score matrix, and expanding the kv heads ourselves is then far cheaper. So ask
    # the CPU dispatcher once whether its flash kernel takes it. Not used on CUDA: fp32 goes
    # to the memory-efficient kernel there, which never takes enable_gqa.
    try:
        from torch.nn.attention import SDPBackend

        q, kv = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)  # [b, n, s, d], 2 query heads per kv head
        return torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=True) == int(SDPBackend.FLASH_ATTENTION)
    except Exception:  # noqa: BLE001 - a torch without enable_gqa or without this private op
        return False


_CPU_SDPA_TAKES_GQA = _cpu_sdpa_takes_gqa()


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) v: q [s, b, n_q, d], k and v [s, b, n_kv, d] -> [s, b, n_q, d]."""
    if backend == FLASH_ATTENTION:
        from flash_attn import flash_attn_func

        # flash-attn takes [b, s, n, d] (any batch, sequence and head strides, unit stride in
        # d) and handles n_q > n_kv itself.
        out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True)
        return out.transpose(0, 1)
    repeats = q.size(2) // k.size(2)
    # SDPA takes [b, n, s, d]: permuted views, no copies. torch 2.13's CPU kernel writes its
    # output in q's [s, b, n, d] memory order, so permuting it back is contiguous too.
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    if repeats == 1:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif _CPU_SDPA_TAKES_GQA and q.device.type == "cpu":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        # kv heads expanded so query head i meets kv head i // repeats.
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.permute(2, 0, 1, 3)


class SelfAttention(nn.Module):
    """Fused-QKV column-parallel projection, RoPE, causal GQA, row-parallel output projection."""

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, qkv_init: InitMethod,
                 output_init: InitMethod, device: torch.device | str | None = None,
                 force_torch_kernels: bool | None = None):
        super().__init__()
        tp = state.tp_size()
        d, n_q, n_kv = config.head_dim, config.num_attention_heads, config.query_groups
        self.head_dim = d
        self.local_query_heads, self.local_kv_heads = n_q // tp, n_kv // tp
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, (n_q + 2 * n_kv) * d,
                                               sequence_parallel=sequence_parallel, init_method=qkv_init,
                                               params_dtype=config.torch_dtype, device=device)
        self.linear_proj = RowParallelLinear(n_q * d, config.hidden_size, input_is_parallel=True,
                                             sequence_parallel=sequence_parallel, init_method=output_init,
                                             params_dtype=config.torch_dtype, device=device)
        self.force_torch_kernels = force_torch_kernels
        # Set by LlamaModel for --recompute-granularity selective.
        self.recompute_core_attention = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (or [s/t, b, h] with sequence parallel) -> the same shape."""
        qkv = self.linear_qkv(x)  # [s, b, (n_q/t + 2 n_kv/t) d]
        s, b = qkv.shape[:2]
        d, groups = self.head_dim, self.local_kv_heads
        per_group = self.local_query_heads // groups
        grouped = qkv.view(s, b, groups, per_group + 2, d)  # [s, b, g, q heads + k + v, d]
        # Rotating the strided query view writes a contiguous [s, b, g, q heads, d] tensor, which
        # is [s, b, n_q/t, d] without a copy: the rotation is the copy the grouped layout needs.
        q = apply_rotary(grouped[:, :, :, :per_group], cos.unsqueeze(2), sin.unsqueeze(2))
        q = q.view(s, b, self.local_query_heads, d)
        k = apply_rotary(grouped[:, :, :, per_group], cos, sin)  # [s, b, n_kv/t, d]
        v = grouped[:, :, :, per_group + 1]
        # Decided on the first call (then cached): the device and dtype that count are the
        # ones the model runs with, after any .cuda() or under autocast.
        backend = attention_backend(q.device, q.dtype, self.force_torch_kernels)
        if self.recompute_core_attention:
            context = recompute(core_attention, q, k, v, backend)  # [s, b, n_q/t, d]
        else:
            context = core_attention(q, k, v, backend)
        return self.linear_proj(context.reshape(s, b, self.local_query_heads * d))
