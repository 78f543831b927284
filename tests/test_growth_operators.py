"""Growth operators on full state dicts: exact tensors for G_stack, identical logits where the function is kept."""

import pytest
import torch

from megagrow.config import model_preset
from megagrow.errors import UserError
from megagrow.growth import GrowthSpec, grow, grown_config, layer_sources
from megagrow.growth.depth import grow_layer
from megagrow.growth.tensors import (
    EMBEDDING,
    FC1,
    FC2,
    LAYER_TENSORS,
    NORMS,
    PROJ,
    QKV,
    check_state_dict,
    init_tensor,
    layer_tensor_name,
    split_layer_name,
)
from megagrow.model.llama import LlamaModel

SEED = 7
TOLERANCE = 1e-5


def base_model(tie_embeddings: bool = False, **overrides) -> tuple[dict[str, torch.Tensor], object]:
    """A trained-looking tiny model: its norm gains are moved away from one so copying them matters."""
    config = model_preset("tiny", tie_embeddings=tie_embeddings, **overrides)
    state = LlamaModel(config, seed=3).state_dict()
    generator = torch.Generator().manual_seed(11)
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    return state, config


def logits(state: dict[str, torch.Tensor], config, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a LlamaModel with `config` holding `state` (CPU, no process groups)."""
    model = LlamaModel(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens)


def layer(state: dict[str, torch.Tensor], number: int) -> dict[str, torch.Tensor]:
    """The tensors of one layer, by their names inside the layer."""
    return {name: state[layer_tensor_name(number, name)] for name in LAYER_TENSORS}


TOKENS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))


def test_names_and_init_match_the_model():
    for tie in (False, True):
        config = model_preset("tiny", tie_embeddings=tie)
        state = LlamaModel(config, seed=SEED).state_dict()
        check_state_dict(state, config)
        for name, tensor in state.items():
            torch.testing.assert_close(init_tensor(name, tensor.shape, config, SEED), tensor, rtol=0, atol=0)


@pytest.mark.parametrize("factor", [2, 4])
def test_stack_copies_every_layer(factor):
    state, config = base_model()
    grown, grown_cfg = grow(state, config, GrowthSpec("depth:stack", factor=factor))
    assert grown_cfg == config.replace(num_layers=factor * config.num_layers)
    assert set(grown) == set(LlamaModel(grown_cfg).state_dict())
    for target in range(grown_cfg.num_layers):
        for name, tensor in layer(grown, target).items():
            assert torch.equal(tensor, layer(state, target % config.num_layers)[name]), (target, name)
    for name in state:
        if split_layer_name(name) is None:
            assert torch.equal(grown[name], state[name])
    assert grown[layer_tensor_name(0, QKV)].data_ptr() != state[layer_tensor_name(0, QKV)].data_ptr()


def test_layer_sources_for_each_layout():
    assert layer_sources(GrowthSpec("depth:stack", factor=2), 3) == [0, 1, 2, 0, 1, 2]
    assert layer_sources(GrowthSpec("depth:interpolate", factor=2), 3) == [0, 0, 1, 1, 2, 2]
    assert layer_sources(GrowthSpec("depth:zero", factor=2), 3) == [0, 1, 2, None, None, None]
    interpolated = GrowthSpec("depth:random", factor=3, layout="interpolate")
    assert layer_sources(interpolated, 2) == [0, None, None, 1, None, None]


def test_interpolate_duplicates_each_layer_in_place():
    state, config = base_model()
    grown, grown_cfg = grow(state, config, GrowthSpec("depth:interpolate", factor=3))
    assert grown_cfg.num_layers == 3 * config.num_layers
    for target in range(grown_cfg.num_layers):
        for name, tensor in layer(grown, target).items():
            assert torch.equal(tensor, layer(state, target // 3)[name]), (target, name)


FUNCTION_PRESERVING = [
    GrowthSpec("depth:zero", factor=2),
    GrowthSpec("depth:zero", factor=3, layout="interpolate"),
    GrowthSpec("width:direct", factor=2, scope="ffn"),
    GrowthSpec("width:direct", factor=2, scope="all"),
    GrowthSpec("width:direct", factor=3, scope="all"),
    GrowthSpec("width:zero", factor=2, scope="ffn"),
]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("spec", FUNCTION_PRESERVING, ids=lambda s: f"{s.operator}-{s.scope}-x{s.factor}")
def test_function_preserving_operators(spec, tie):
    state, config = base_model(tie_embeddings=tie)
    grown, grown_cfg = grow(state, config, spec)
    assert grown_cfg == grown_config(config, spec)
    torch.testing.assert_close(logits(grown, grown_cfg, TOKENS), logits(state, config, TOKENS),
                               rtol=0, atol=TOLERANCE)


def test_growth_steps_compose():
    # Multi-head attention (no query groups), widened 4x, then deepened with silent layers.
    state, config = base_model(num_query_groups=None)
    wide, wide_cfg = grow(state, config, GrowthSpec("width:direct", factor=4))
    deep, deep_cfg = grow(wide, wide_cfg, GrowthSpec("depth:zero", factor=2, layout="interpolate"))
    assert (deep_cfg.num_layers, deep_cfg.hidden_size, deep_cfg.num_attention_heads) == (4, 256, 16)
    torch.testing.assert_close(logits(deep, deep_cfg, TOKENS), logits(state, config, TOKENS), rtol=0, atol=TOLERANCE)


def test_width_zero_is_exact_without_eps():
    # The wider RMSNorm sees eps as if it were k * eps (see width.py); everything else is exact.
    spec = GrowthSpec("width:zero", factor=2, scope="all")
    state, config = base_model(norm_eps=1e-12)
    grown, grown_cfg = grow(state, config, spec)
    torch.testing.assert_close(logits(grown, grown_cfg, TOKENS), logits(state, config, TOKENS),
                               rtol=0, atol=TOLERANCE)
    state, config = base_model()
    grown, grown_cfg = grow(state, config, spec)
    gap = (logits(grown, grown_cfg, TOKENS) - logits(state, config, TOKENS)).abs().max().item()
    assert 1e-6 < gap < 0.05


def test_grown_configs():
    config = model_preset("tiny")
    wide = grown_config(config, GrowthSpec("width:direct", factor=2))
    assert (wide.hidden_size, wide.num_attention_heads, wide.num_query_groups, wide.ffn_hidden_size) == (128, 8, 4, 352)
    assert wide.head_dim == config.head_dim and wide.num_layers == config.num_layers
    assert grown_config(config, GrowthSpec("width:zero", factor=3, scope="ffn")) == config.replace(ffn_hidden_size=528)
    assert grown_config(config, GrowthSpec("depth:random", factor=4)) == config.replace(num_layers=8)
    mha = model_preset("tiny", num_query_groups=None)
    assert grown_config(mha, GrowthSpec("width:random", factor=2)).num_query_groups is None


def test_new_depth_layers_are_the_models_own_init():
    state, config = base_model()
    spec = GrowthSpec("depth:random", factor=2, seed=SEED)
    grown, grown_cfg = grow(state, config, spec)
    fresh = LlamaModel(grown_cfg, seed=SEED).state_dict()
    for target, source in enumerate(layer_sources(spec, config.num_layers)):
        expected = fresh if source is None else state
        for name in LAYER_TENSORS:
            full = layer_tensor_name(target, name)
            reference = expected[full] if source is None else expected[layer_tensor_name(source, name)]
            assert torch.equal(grown[full], reference), full
    # Output projections use the grown depth: std / sqrt(2 * 4) for 4 layers.
    assert abs(grown[layer_tensor_name(3, FC2)].std().item() - 0.02 / 8**0.5) < 0.002


def test_zero_depth_layers_are_silent_but_trainable():
    state, config = base_model()
    grown, grown_cfg = grow(state, config, GrowthSpec("depth:zero", factor=2, seed=SEED))
    fresh = LlamaModel(grown_cfg, seed=SEED).state_dict()
    for target in (2, 3):
        assert not grown[layer_tensor_name(target, PROJ)].any() and not grown[layer_tensor_name(target, FC2)].any()
        for name in (QKV, FC1, *NORMS):
            assert torch.equal(grown[layer_tensor_name(target, name)], fresh[layer_tensor_name(target, name)])
    model = LlamaModel(grown_cfg)
    model.load_state_dict(grown)
    model(TOKENS, labels=TOKENS).mean().backward()
    for target in (2, 3):
        assert model.decoder.layers[target].self_attention.linear_proj.weight.grad.abs().sum() > 0
        assert model.decoder.layers[target].mlp.linear_fc2.weight.grad.abs().sum() > 0


def test_width_zero_new_units_receive_gradients():
    state, config = base_model()
    grown, grown_cfg = grow(state, config, GrowthSpec("width:zero", factor=2, scope="all"))
    model = LlamaModel(grown_cfg)
    model.load_state_dict(grown)
    model(TOKENS, labels=TOKENS).mean().backward()
    h, ffn = config.hidden_size, config.ffn_hidden_size
    down = model.decoder.layers[0].mlp.linear_fc2.weight.grad
    assert down[h:, :].abs().sum() > 0  # rows writing the new hidden channels
    assert down[:, ffn:].abs().sum() > 0  # columns reading the new FFN neurons


def test_width_random_keeps_old_values_and_draws_the_rest():
    state, config = base_model()
    spec = GrowthSpec("width:random", factor=2, seed=SEED)
    grown, grown_cfg = grow(state, config, spec)
    fresh = LlamaModel(grown_cfg, seed=SEED).state_dict()
    assert {n: t.shape for n, t in grown.items()} == {n: t.shape for n, t in fresh.items()}
    h, ffn = config.hidden_size, config.ffn_hidden_size
    down = grown[layer_tensor_name(0, FC2)]
    assert torch.equal(down[:h, :ffn], state[layer_tensor_name(0, FC2)])
    assert torch.equal(down[h:, :], fresh[layer_tensor_name(0, FC2)][h:, :])
    gate_up, old_gate_up = grown[layer_tensor_name(1, FC1)], state[layer_tensor_name(1, FC1)]
    assert torch.equal(gate_up[2 * ffn:3 * ffn, :h], old_gate_up[ffn:, :])  # up block starts after the grown gate
    embedding = grown[EMBEDDING]
    assert torch.equal(embedding[:, :h], state[EMBEDDING])
    assert not embedding[config.vocab_size:].any()  # padding rows stay zero
    new_qkv = grown[layer_tensor_name(0, QKV)][:, h:]
    assert abs(new_qkv.std().item() - config.init_method_std) < 0.002
    gap = (logits(grown, grown_cfg, TOKENS) - logits(state, config, TOKENS)).abs().max().item()
    assert gap > 1e-3


def test_streaming_layer_by_layer_matches_grow():
    state, config = base_model()
    for spec in (GrowthSpec("depth:stack", factor=2), GrowthSpec("depth:zero", factor=2, layout="interpolate")):
        grown, grown_cfg = grow(state, config, spec)
        for target, source in enumerate(layer_sources(spec, config.num_layers)):
            streamed = grow_layer(None if source is None else layer(state, source), target, grown_cfg,
                                  spec.growth_operator.fill, spec.seed, torch.float32)
            for name, tensor in streamed.items():
                assert torch.equal(tensor, grown[layer_tensor_name(target, name)])


def test_bfloat16_state_dicts_stay_bfloat16():
    state, config = base_model()
    state = {name: tensor.bfloat16() for name, tensor in state.items()}
    for spec in (GrowthSpec("width:direct", factor=2), GrowthSpec("depth:random", factor=2)):
        grown, _ = grow(state, config, spec)
        assert {tensor.dtype for tensor in grown.values()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, message", [
    (dict(operator="depth:learn"), "G_learn is not implemented"),
    (dict(operator="depth:stack", factor=1), "at least 2"),
    (dict(operator="depth:stack", layout="interpolate"), "use depth:interpolate"),
    (dict(operator="width:direct", layout="stack"), "applies to depth operators"),
    (dict(operator="width:direct", scope="heads"), "width scope"),
])
def test_spec_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        GrowthSpec(**kwargs)


def test_state_dict_must_match_config():
    state, config = base_model()
    with pytest.raises(UserError, match="missing"):
        grow(state, config.replace(num_layers=3), GrowthSpec("depth:stack"))
    with pytest.raises(UserError, match="shape"):
        grow(state, config.replace(ffn_hidden_size=64), GrowthSpec("width:direct"))
