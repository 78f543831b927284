"""The SwiGLU gate: eager by default, torch.compile on request, eager when compile is unavailable; logged once."""

import logging

import pytest
import torch
import torch.nn.functional as F

from megagrow.config import ModelConfig
from megagrow.model import backends, swiglu
from megagrow.model.llama import LlamaModel

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, vocab_size=40,
                     seq_length=8, make_vocab_size_divisible_by=8)


@pytest.fixture(autouse=True)
def fresh_choices():
    backends.reset_backend_choices()
    yield
    backends.reset_backend_choices()


def test_gate_reads_the_fused_gate_up_layout():
    gate_up = torch.randn(3, 2, 10)
    torch.testing.assert_close(swiglu.swiglu(gate_up), F.silu(gate_up[..., :5]) * gate_up[..., 5:])


def test_eager_unless_requested_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="megagrow.model"):
        model = LlamaModel(CONFIG, seed=1, force_torch_kernels=True)
        model(torch.zeros(1, 8, dtype=torch.long))
    assert swiglu.swiglu_implementation(False) is swiglu.swiglu
    assert sum("SwiGLU gate: eager (--compile-mlp not given)" in r.message for r in caplog.records) == 1


def test_falls_back_to_eager_when_compile_is_unavailable(caplog, monkeypatch):
    monkeypatch.setattr(swiglu, "_compile_unavailable_reason", lambda: "torch.compile does not support this Python")
    reference = LlamaModel(CONFIG, seed=1, force_torch_kernels=True)
    with caplog.at_level(logging.INFO, logger="megagrow.model"):
        model = LlamaModel(CONFIG, seed=1, force_torch_kernels=True, compile_mlp=True)
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(tokens, labels=tokens)
    assert all(layer.mlp.compile_gate for layer in model.decoder.layers)
    assert swiglu.swiglu_implementation(True) is swiglu.swiglu
    assert any("SwiGLU gate: eager (torch.compile does not support" in r.message for r in caplog.records)
    torch.testing.assert_close(loss, reference(tokens, labels=tokens), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_gate_matches_eager_on_cpu():
    # Marked slow: inductor's first CPU compile of even this tiny graph takes ~20 s here.
    if swiglu._compile_unavailable_reason() is not None:
        pytest.skip(swiglu._compile_unavailable_reason())
    compiled = swiglu.swiglu_implementation(True)
    assert compiled is not swiglu.swiglu
    x = torch.randn(4, 3, 16, requires_grad=True)
    compiled(x).pow(2).sum().backward()
    compiled_grad, x.grad = x.grad, None
    swiglu.swiglu(x).pow(2).sum().backward()
    torch.testing.assert_close(compiled(x), swiglu.swiglu(x))
    torch.testing.assert_close(compiled_grad, x.grad)
