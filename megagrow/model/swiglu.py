"""The SwiGLU gate, silu(gate) * up, eager or fused into one kernel by torch.compile (--compile-mlp).

Eagerly the gate is three memory-bound kernels over [s, b, ffn/t] (silu, multiply, and the
split's strided reads), each reading and writing the whole tensor; compiled, it is one
kernel that reads the fused gate/up projection once and writes the product once. Only this
elementwise part is compiled: the projections around it are already single GEMMs, and the
tensor-parallel collectives in them would only break the graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from megagrow.model.backends import log_choice

EAGER = "eager"
COMPILED = "torch.compile"


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the fused projection's output [..., 2 * f] (gate block first) -> [..., f]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _compile_unavailable_reason() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as err:  # noqa: BLE001 - a broken inductor install means: run eagerly
        return f"torch._dynamo unusable ({type(err).__name__})"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_swiglu() -> Callable[[torch.Tensor], torch.Tensor]:
    # One compiled function shared by every layer: compiled once per input shape and dtype.
    return torch.compile(swiglu, dynamic=False)


def swiglu_implementation(compile_requested: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SwiGLU gate function to use: compiled when requested and possible, else eager (logged once)."""
    reason = _compile_unavailable_reason() if compile_requested else "--compile-mlp not given"
    choice = COMPILED if compile_requested and reason is None else EAGER
    log_choice("SwiGLU gate", choice, reason or "--compile-mlp")
    return _compiled_swiglu() if choice == COMPILED else swiglu
