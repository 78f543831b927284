"""megatron-core's names for the weights of a Llama `GPTModel`: what megagrow's model registers and its checkpoints hold.

    embedding.word_embeddings.weight                  [padded_vocab/t, h]
    decoder.layers.N.input_layernorm.weight           [h]
    decoder.layers.N.self_attention.linear_qkv.weight [(n_q + 2 n_kv) d / t, h]  q/k/v per query group
    decoder.layers.N.self_attention.linear_proj.weight [h, n_q d / t]
    decoder.layers.N.pre_mlp_layernorm.weight         [h]
    decoder.layers.N.mlp.linear_fc1.weight            [2 ffn / t, h]  [gate; up] of this tp rank
    decoder.layers.N.mlp.linear_fc2.weight            [h, ffn / t]
    decoder.final_layernorm.weight                    [h]
    output_layer.weight                               [padded_vocab/t, h]  (absent when tied, pp = 1)

N counts the layers of one pipeline stage from 0 (megatron-core numbers a stage's
`decoder.layers` locally, and so do its `torch`-format files); full state dicts, which hold
every layer, number them globally. Transformer Engine layer specs fuse each norm into the
linear layer after it (`TE_NORM_ALIASES`), and `torch_dist` checkpoints always use those
fused names, with the layers stacked along a leading dimension (`stacked_key`).
"""

from __future__ import annotations

import re

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"

LAYER_PREFIX = "decoder.layers."
INPUT_NORM = "input_layernorm.weight"
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
PRE_MLP_NORM = "pre_mlp_layernorm.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
LAYER_SUFFIXES = (INPUT_NORM, QKV, PROJ, PRE_MLP_NORM, FC1, FC2)
NORM_SUFFIXES = (INPUT_NORM, PRE_MLP_NORM)
# Projections that write into the residual stream; initialised with std / sqrt(2 * num_layers).
OUTPUT_PROJECTIONS = (PROJ, FC2)

# Transformer Engine specs (Megatron-LM's default) keep each norm inside the next linear layer.
TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": INPUT_NORM,
    "mlp.linear_fc1.layer_norm_weight": PRE_MLP_NORM,
}
LOCAL_TO_TE = {local: te for te, local in TE_NORM_ALIASES.items()}

# Modules of the local spec that carry an `_extra_state` entry (None) in megatron-core state dicts.
EXTRA_STATE_LAYER_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                             "mlp.linear_fc2")
EXTRA_STATE_SUFFIX = "._extra_state"

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_param_name(layer: int, suffix: str) -> str:
    """Name of parameter `suffix` (e.g. 'mlp.linear_fc2.weight') of layer `layer`."""
    return f"{LAYER_PREFIX}{layer}.{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer number, suffix) of any `decoder.layers.N.…` name, None for other names."""
    match = _LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def renumber_layers(state: dict, offset: int) -> dict:
    """The same entries with every layer number shifted by `offset` (local <-> global numbering)."""
    renamed = {}
    for name, value in state.items():
        parsed = split_layer_name(name)
        renamed[layer_param_name(parsed[0] + offset, parsed[1]) if parsed else name] = value
    return renamed


def stacked_key(suffix: str) -> str:
    """torch_dist key of a layer parameter: every layer stacked along dim 0, norms under their TE names."""
    return LAYER_PREFIX + LOCAL_TO_TE.get(suffix, suffix)


def extra_state_names(layers: range, has_output_layer: bool) -> list[str]:
    """The `_extra_state` entries megatron-core's local-spec GPTModel has for these (local) layers."""
    names = [layer_param_name(n, module) + EXTRA_STATE_SUFFIX for n in layers for module in EXTRA_STATE_LAYER_MODULES]
    return names + (["output_layer" + EXTRA_STATE_SUFFIX] if has_output_layer else [])


def canonical_model_state(state: dict, where: str) -> dict:
    """A Megatron model state dict in the local spec's names: TE-fused norms renamed, `_extra_state` entries dropped.

    Anything that is not a weight of megagrow's Llama (a bias, a learned position table, an
    expert) is refused in one line naming it.
    """
    from megagrow.errors import UserError

    canonical = {}
    for name, value in state.items():
        if name.endswith(EXTRA_STATE_SUFFIX):
            continue  # Transformer Engine / local-spec bookkeeping (fp8 metadata or None), not weights
        parsed = split_layer_name(name)
        if parsed is not None:
            suffix = TE_NORM_ALIASES.get(parsed[1], parsed[1])
            if suffix not in LAYER_SUFFIXES:
                raise UserError(f"{where}: holds {name}, which is not a weight of megagrow's Llama (biases, LayerNorm, "
                                f"experts and other extras are not supported)")
            canonical[layer_param_name(parsed[0], suffix)] = value
        elif name in (EMBEDDING, FINAL_NORM, OUTPUT_LAYER):
            canonical[name] = value
        else:
            raise UserError(f"{where}: holds {name}, which is not a weight of megagrow's Llama (biases, LayerNorm, "
                            f"learned position embeddings and other extras are not supported)")
    return canonical
