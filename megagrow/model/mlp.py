"""SwiGLU feed-forward block: fc2(silu(gate(x)) * up(x)), tensor-parallel over the FFN width.

Fused gate/up layout, megatron-core's (`linear_fc1`). One ColumnParallelLinear with two
blocks sharded over tp on their own (see megagrow.parallel.layers):

    full weight   [W_gate; W_up]                     each [ffn, h]
    rank r holds  [W_gate rows r*ffn/t .. (r+1)*ffn/t - 1;
                   W_up rows of the same range]

so W_gate and W_up are HF's gate_proj and up_proj unchanged, and each rank multiplies the
gate and up channels it owns without communication. The down projection (`linear_fc2`)
is row-parallel.
"""

from __future__ import annotations

import torch
from torch import nn

from megagrow.config import ModelConfig
from megagrow.model.swiglu import swiglu_implementation
from megagrow.parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear


class SwiGLUMLP(nn.Module):
    """Column-parallel fused gate/up projection, SiLU gating, row-parallel down projection."""

    def __init__(self, config: ModelConfig, *, sequence_parallel: bool, fc1_init: InitMethod,
                 fc2_init: InitMethod, device: torch.device | str | None = None):
        super().__init__()
        ffn = config.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * ffn, output_partition_sizes=(ffn, ffn),
                                               sequence_parallel=sequence_parallel, init_method=fc1_init,
                                               params_dtype=config.torch_dtype, device=device)
        self.linear_fc2 = RowParallelLinear(ffn, config.hidden_size, input_is_parallel=True,
                                            sequence_parallel=sequence_parallel, init_method=fc2_init,
                                            params_dtype=config.torch_dtype, device=device)
        # Set by LlamaModel for --compile-mlp.
        self.compile_gate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (or [s/t, b, h] with sequence parallel) -> the same shape."""
        gate = swiglu_implementation(self.compile_gate)
        return self.linear_fc2(gate(self.linear_fc1(x)))  # fc1 [s, b, 2 ffn/t] -> [s, b, ffn/t] -> fc2
