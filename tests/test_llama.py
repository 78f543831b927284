"""Llama model pieces against naive references: RoPE, GQA attention, the whole forward, stage splits, backends."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.model import attention, backends
from megagrow.model.attention import core_attention
from megagrow.model.llama import LlamaModel
from megagrow.model.rope import RotaryEmbedding, apply_rotary
from megagrow.parallel import state

CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=40, seq_length=12, make_vocab_size_divisible_by=8, rope_theta=500.0)


def _naive_rope(x, positions, theta):
    """HF Llama's rotation written out per channel pair (i, i + d/2); x [..., s, d]."""
    d = x.size(-1)
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * inv_freq[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _naive_attention(q, k, v):
    """Causal attention with an explicit mask; q [b, n_q, s, d], k/v [b, n_kv, s, d]."""
    group = q.size(1) // k.size(1)
    outputs = []
    for head in range(q.size(1)):
        scores = q[:, head] @ k[:, head // group].transpose(-1, -2) / math.sqrt(q.size(-1))
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        outputs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, head // group])
    return torch.stack(outputs, dim=1)


def _naive_rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _naive_llama_logits(config, weights, input_ids):
    """Logits [b, s, v] computed from the full weights, reading the fused layouts the modules document."""
    b, s = input_ids.shape
    d, n_q, n_kv = config.head_dim, config.num_attention_heads, config.query_groups
    positions = torch.arange(s)
    x = weights["embedding.word_embeddings.weight"][input_ids]
    for layer in range(config.num_layers):
        w = {name.removeprefix(f"decoder.layers.{layer}."): value for name, value in weights.items()}
        normed = _naive_rms(x, w["input_layernorm.weight"], config.norm_eps)
        # megatron-core's linear_qkv: per query group, its n_q/n_kv query heads, then its k head, then its v head.
        grouped = w["self_attention.linear_qkv.weight"].view(n_kv, n_q // n_kv + 2, d, -1)
        w_q = grouped[:, :-2].reshape(n_q * d, -1)
        w_k, w_v = grouped[:, -2].reshape(n_kv * d, -1), grouped[:, -1].reshape(n_kv * d, -1)
        q, k, v = ((normed @ m.T).view(b, s, -1, d).transpose(1, 2) for m in (w_q, w_k, w_v))
        q, k = _naive_rope(q, positions, config.rope_theta), _naive_rope(k, positions, config.rope_theta)
        context = _naive_attention(q, k, v).transpose(1, 2).reshape(b, s, n_q * d)
        x = x + context @ w["self_attention.linear_proj.weight"].T
        normed = _naive_rms(x, w["pre_mlp_layernorm.weight"], config.norm_eps)
        w_gate, w_up = w["mlp.linear_fc1.weight"].chunk(2)
        x = x + (F.silu(normed @ w_gate.T) * (normed @ w_up.T)) @ w["mlp.linear_fc2.weight"].T
    x = _naive_rms(x, weights["decoder.final_layernorm.weight"], config.norm_eps)
    return x @ weights["output_layer.weight"][: config.vocab_size].T


def _tokens(seed=0):
    return torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length), generator=torch.Generator().manual_seed(seed))


def test_rope_matches_hf_rotate_half_convention():
    x = torch.randn(3, 2, 4, 16)  # [s, b, n, d]
    rotary = RotaryEmbedding(16, max_positions=8, theta=500.0)
    cos, sin = rotary(3)
    expected = _naive_rope(x.permute(1, 2, 0, 3), torch.arange(3), 500.0).permute(2, 0, 1, 3)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


def test_rope_properties():
    rotary = RotaryEmbedding(8, max_positions=32, theta=10000.0)
    q, k = torch.randn(2, 32, 1, 1, 8).unbind(0)
    cos, sin = rotary(32)
    q_rot = apply_rotary(q, cos, sin)
    torch.testing.assert_close(q_rot[0], q[0])  # position 0 is not rotated
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))  # rotations keep norms
    # The score between positions m and n depends on m - n only.
    same_query, same_key = q[:1].expand(32, 1, 1, 8), k[:1].expand(32, 1, 1, 8)
    q_all, k_all = apply_rotary(same_query, cos, sin), apply_rotary(same_key, cos, sin)
    scores = (q_all[:, None] * k_all[None, :]).sum(-1).squeeze(-1).squeeze(-1)  # [m, n]
    for offset in (0, 3, -5):
        diagonal = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-4, atol=1e-5)
    # Casting a model to bf16 must not round the angles.
    assert torch.nn.Sequential(rotary).to(torch.bfloat16)[0](3)[0].dtype == torch.float32
    # Explicit positions give the same tables as the default ones.
    by_position = rotary(5, position_ids=torch.arange(5).expand(2, 5))
    torch.testing.assert_close(by_position[0], cos[:5].expand(5, 2, 1, 8))


def _textbook_rotary(x, cos, sin):
    """x cos + rotate_half(x) sin in float32, as HF Llama writes it; autograd does the backward."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("by_position", [False, True])
def test_rotary_equals_the_textbook_formula_bit_for_bit(dtype, by_position):
    rotary = RotaryEmbedding(16, max_positions=64, theta=10000.0)
    positions = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:7].expand(3, 7)
    cos, sin = rotary(7, positions if by_position else None)
    x = torch.randn(7, 3, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)  # [s, b, n, d]
    grad = torch.randn(7, 3, 5, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for rotate in (apply_rotary, _textbook_rotary):
        leaf = x.clone().requires_grad_()
        out = rotate(leaf, cos, sin)
        out.backward(grad)
        results.append((out, leaf.grad))
    (out, grad_x), (expected, expected_grad) = results
    assert out.dtype == grad_x.dtype == dtype
    assert torch.equal(out, expected) and torch.equal(grad_x, expected_grad)


def test_rotary_gradient_of_a_broadcast_input():
    rotary = RotaryEmbedding(8, max_positions=16, theta=10000.0)
    cos, sin = rotary(4, torch.arange(4).expand(2, 4))  # [s, b=2, 1, d]
    x = torch.randn(4, 1, 3, 8, dtype=torch.float64, requires_grad=True)  # broadcast over b
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos.double(), sin.double()), (x,))


def test_gqa_attention_matches_naive_reference():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(6, 2, 4, 8, generator=generator)  # [s, b, n_q, d]
    k, v = torch.randn(2, 6, 2, 2, 8, generator=generator).unbind(0)  # [s, b, n_kv, d]
    out = core_attention(q, k, v, backends.SDPA)
    expected = _naive_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v))).permute(2, 0, 1, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_gqa_without_enable_gqa_expands_kv_heads_to_the_same_result(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(9, 2, 6, 8, generator=generator, requires_grad=True)  # [s, b, n_q, d]
    k, v = (torch.randn(9, 2, 2, 8, generator=generator, requires_grad=True) for _ in range(2))  # [s, b, n_kv, d]
    takes_gqa, runs = attention._CPU_SDPA_TAKES_GQA, []
    for native in (True, False):  # enable_gqa and the repeat_interleave fallback
        monkeypatch.setattr(attention, "_CPU_SDPA_TAKES_GQA", native)
        out = core_attention(q, k, v, backends.SDPA)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for native, fallback in zip(*runs):
        torch.testing.assert_close(native, fallback, rtol=1e-5, atol=1e-6)
    if torch.__version__ >= "2.13":  # the pinned torch: its CPU flash kernel takes GQA, writes [s, b, n_q, d] order
        assert takes_gqa and runs[0][0].is_contiguous()


def test_model_compiles_without_graph_breaks():
    # fullgraph=True raises on any graph break; the backend choices and their logging used to
    # make one in every norm and attention, sending LlamaModel.forward back to eager.
    model = LlamaModel(CONFIG, seed=3, force_torch_kernels=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    input_ids = _tokens()
    torch.testing.assert_close(compiled(input_ids, labels=input_ids), model(input_ids, labels=input_ids))


def test_model_matches_naive_llama():
    model = LlamaModel(CONFIG, seed=3, force_torch_kernels=True)
    weights = {name: param.detach() for name, param in model.named_parameters()}
    input_ids = _tokens()
    with torch.no_grad():
        logits = model(input_ids)
        expected = _naive_llama_logits(CONFIG, weights, input_ids)
        loss = model(input_ids, labels=input_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    reference_loss = F.cross_entropy(expected.reshape(-1, CONFIG.vocab_size), input_ids.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, reference_loss.view_as(loss), rtol=1e-4, atol=1e-5)


def test_pipeline_stages_compose_to_the_full_model():
    full = LlamaModel(CONFIG, seed=5, force_torch_kernels=True)
    first = LlamaModel(CONFIG, pre_process=True, post_process=False, layer_range=(0, 1), seed=5,
                       force_torch_kernels=True)
    last = LlamaModel(CONFIG, pre_process=False, post_process=True, layer_range=(1, 2), seed=5,
                      force_torch_kernels=True)
    assert first.output_layer is None and last.embedding is None
    # megatron-core's numbering: a stage's layers count from 0; the offset says which global layers they are.
    assert len(last.decoder.layers) == 1 and last.layer_offset == 1
    assert set(last.state_dict()) == {"decoder.layers.0." + s for s in (
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")} | {
        "decoder.final_layernorm.weight", "output_layer.weight"}
    # Initialised by global name: the last stage's layer is the full model's layer 1.
    torch.testing.assert_close(last.decoder.layers[0].mlp.linear_fc2.weight, full.decoder.layers[1].mlp.linear_fc2.weight)
    input_ids = _tokens(1)
    with torch.no_grad():
        hidden = first(input_ids)
        assert hidden.shape == (CONFIG.seq_length, 2, CONFIG.hidden_size)
        torch.testing.assert_close(last(hidden_states=hidden), full(input_ids))


def test_tied_embeddings_share_one_weight_and_match_across_stages():
    tied = CONFIG.replace(tie_embeddings=True)
    model = LlamaModel(tied, seed=5, force_torch_kernels=True)
    assert model.output_layer.weight is None and model.embedding.word_embeddings.weight.shared_embedding
    last = LlamaModel(tied, pre_process=False, post_process=True, layer_range=(1, 2), seed=5,
                      force_torch_kernels=True)
    torch.testing.assert_close(last.output_layer.weight, model.embedding.word_embeddings.weight)


def test_fallback_backends_forced_and_logged_once(caplog, monkeypatch):
    backends.reset_backend_choices()
    monkeypatch.setattr(backends, "_importable", lambda module: True)  # pretend flash-attn and apex exist
    with caplog.at_level(logging.INFO, logger="megagrow.model"):
        assert backends.attention_backend("cuda", torch.bfloat16, force_torch=True) == backends.SDPA
        assert backends.norm_backend("cuda", force_torch=True) == backends.TORCH_RMSNORM
        model = LlamaModel(CONFIG, force_torch_kernels=True)
        model(_tokens())  # 2 attentions and 5 norms run: no new decision, no new log line
    messages = [record.getMessage() for record in caplog.records
                if record.name == "megagrow.model" and " backend: " in record.getMessage()]
    assert len(messages) == 2 and all("forced" in message for message in messages)
    backends.reset_backend_choices()


def test_backend_choice_rules(monkeypatch):
    backends.reset_backend_choices()
    monkeypatch.setattr(backends, "_importable", lambda module: True)
    assert backends.attention_backend("cuda", torch.bfloat16) == backends.FLASH_ATTENTION
    assert backends.norm_backend("cuda") == backends.APEX_RMSNORM
    assert backends.attention_backend("cuda", torch.float32) == backends.SDPA  # flash-attn needs half precision
    assert backends.attention_backend("cpu", torch.bfloat16) == backends.SDPA
    backends.reset_backend_choices()
    monkeypatch.setenv(backends.FORCE_TORCH_KERNELS_ENV, "1")
    assert backends.attention_backend("cuda", torch.bfloat16) == backends.SDPA
    assert backends.norm_backend("cuda") == backends.TORCH_RMSNORM
    backends.reset_backend_choices()
    monkeypatch.setattr(backends, "_importable", lambda module: False)
    monkeypatch.delenv(backends.FORCE_TORCH_KERNELS_ENV)
    assert backends.attention_backend("cuda", torch.bfloat16) == backends.SDPA
    backends.reset_backend_choices()


def _build_with_heads_not_divisible():
    state.initialize(tp=2)
    try:
        config = ModelConfig(num_layers=1, hidden_size=48, ffn_hidden_size=64, num_attention_heads=3,
                             vocab_size=16, seq_length=8)
        LlamaModel(config)
    finally:
        state.destroy()


def test_single_fused_kernels_can_be_disabled(monkeypatch):
    backends.reset_backend_choices()
    monkeypatch.setattr(backends, "_importable", lambda module: True)
    monkeypatch.setenv(backends.DISABLE_FUSED_ENV, "attention")
    assert backends.attention_backend("cuda", torch.bfloat16) == backends.SDPA
    assert backends.norm_backend("cuda") == backends.APEX_RMSNORM
    backends.reset_backend_choices()
    monkeypatch.setenv(backends.DISABLE_FUSED_ENV, "rmsnorm")
    assert backends.attention_backend("cuda", torch.bfloat16) == backends.FLASH_ATTENTION
    assert backends.norm_backend("cuda") == backends.TORCH_RMSNORM
    backends.reset_backend_choices()


def test_heads_not_divisible_by_tp_is_rejected():
    with pytest.raises(UserError, match="num_attention_heads 3 is not divisible by tensor-parallel size 2"):
        run_distributed(_build_with_heads_not_divisible, 2)
