"""Model/parallel configs: presets, validation, parameter counts and training FLOPs."""

import pytest

from megagrow.config import (
    ModelConfig,
    ParallelConfig,
    model_preset,
    num_parameters,
    padded_vocab_size,
    training_flops_per_token,
    validate_parallel,
)
from megagrow.errors import UserError
from megagrow.model.llama import LlamaModel


def _count_from_architecture(config: ModelConfig) -> int:
    """Sum of the shapes of HF Llama's weights, written out independently of num_parameters."""
    h, v, f = config.hidden_size, config.vocab_size, config.ffn_hidden_size
    kv = config.query_groups * config.head_dim
    shapes = [(v, h)]  # embed_tokens
    for _ in range(config.num_layers):
        shapes += [(h, h), (kv, h), (kv, h), (h, h)]  # q, k, v, o
        shapes += [(f, h), (f, h), (h, f)]  # gate, up, down
        shapes += [(h,), (h,)]  # input and post-attention norms
    shapes += [(h,)]  # final norm
    if not config.tie_embeddings:
        shapes += [(v, h)]  # lm_head
    total = 0
    for shape in shapes:
        size = 1
        for dim in shape:
            size *= dim
        total += size
    return total


@pytest.mark.parametrize("name, expected", [("tinyllama-1.1b", 1_100_048_384), ("llama2-7b", 6_738_415_616)])
def test_known_parameter_counts(name, expected):
    config = model_preset(name)
    assert not config.tie_embeddings
    assert _count_from_architecture(config) == expected
    assert num_parameters(config) == expected


def test_preset_architectures():
    tiny_llama = model_preset("tinyllama-1.1b")
    assert (tiny_llama.num_layers, tiny_llama.hidden_size, tiny_llama.num_attention_heads,
            tiny_llama.query_groups, tiny_llama.ffn_hidden_size, tiny_llama.vocab_size, tiny_llama.seq_length,
            tiny_llama.rope_theta, tiny_llama.norm_eps) == (22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5)
    llama2 = model_preset("llama2-7b")
    assert llama2.query_groups == llama2.num_attention_heads == 32 and llama2.seq_length == 4096
    assert model_preset("tiny", num_layers=4).num_layers == 4


def test_count_matches_a_built_model():
    config = model_preset("tiny", tie_embeddings=False)
    assert padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, 1) == config.vocab_size
    model = LlamaModel(config, force_torch_kernels=True)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)
    tied = LlamaModel(config.replace(tie_embeddings=True), force_torch_kernels=True)
    assert sum(p.numel() for p in tied.parameters()) == num_parameters(config.replace(tie_embeddings=True))


def test_training_flops_per_token():
    config = model_preset("tinyllama-1.1b")
    matmul_params = 1_100_048_384 - 32000 * 2048  # the input embedding is a lookup
    assert training_flops_per_token(config) == 6 * matmul_params + 12 * 22 * 2048 * 2048
    assert training_flops_per_token(config, seq_length=1024) == 6 * matmul_params + 12 * 22 * 2048 * 1024
    tied = config.replace(tie_embeddings=True)
    assert training_flops_per_token(tied) == 6 * num_parameters(tied) + 12 * 22 * 2048 * 2048


def test_padded_vocab_size():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32000, 128, 2) == 32000
    assert padded_vocab_size(32001, 128, 1) == 32128
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(100, 8, 4) == 128


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 60}, "hidden_size 60 is not divisible by num_attention_heads 8"),
    ({"num_query_groups": 3}, "num_attention_heads 8 is not divisible by num_query_groups 3"),
    ({"max_position_embeddings": 8}, "max_position_embeddings 8 is shorter than seq_length 16"),
    ({"params_dtype": "float64"}, "params_dtype 'float64'"),
    ({"num_layers": 0}, "num_layers must be positive"),
])
def test_invalid_model_config_is_one_clear_line(changes, message):
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                vocab_size=100, seq_length=16)
    with pytest.raises(UserError, match=message) as raised:
        ModelConfig(**{**base, **changes})
    assert "\n" not in str(raised.value)


def test_heads_and_groups_must_divide_over_tp():
    config = model_preset("tiny")  # 4 heads, 2 kv groups
    validate_parallel(config, ParallelConfig(tp=2))
    with pytest.raises(UserError, match="num_attention_heads 4 is not divisible by tensor-parallel size 3"):
        validate_parallel(config, ParallelConfig(tp=3))
    with pytest.raises(UserError, match="num_query_groups 2 is not divisible by tensor-parallel size 4"):
        validate_parallel(config, ParallelConfig(tp=4))
    with pytest.raises(UserError, match="seq_length 63 divisible"):
        validate_parallel(config.replace(seq_length=63), ParallelConfig(tp=2, sequence_parallel=True))


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown model preset 'gpt5'; choose one of llama2-7b, small-cpu"):
        model_preset("gpt5")
