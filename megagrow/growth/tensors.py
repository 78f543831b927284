"""Names, shapes and initial values of the tensors in a full (unsharded) Llama state dict.

The growth operators work on the state dict of a tp=1, pp=1 LlamaModel, which is the full
state dict of any layout (megatron-core's names, megagrow/checkpoint/names.py):

    embedding.word_embeddings.weight                   [padded_vocab, h]
    decoder.layers.N.input_layernorm.weight            [h]
    decoder.layers.N.self_attention.linear_qkv.weight  [(n_q + 2 n_kv) d, h]  q, k, v rows per query group
    decoder.layers.N.self_attention.linear_proj.weight [h, n_q d]
    decoder.layers.N.pre_mlp_layernorm.weight          [h]
    decoder.layers.N.mlp.linear_fc1.weight             [2 ffn, h]             rows [W_gate; W_up]
    decoder.layers.N.mlp.linear_fc2.weight             [h, ffn]
    decoder.final_layernorm.weight                     [h]
    output_layer.weight                                [padded_vocab, h]      absent when tied

`init_tensor` reproduces what LlamaModel(config, seed=seed) draws for one of these, so a
new layer or a new slice made by a growth operator is exactly the model's own initialisation
(tests/test_growth_operators.py checks it against a freshly built model).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from megagrow.checkpoint.names import (
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    LAYER_SUFFIXES,
    NORM_SUFFIXES,
    OUTPUT_LAYER,
    OUTPUT_PROJECTIONS,
    PRE_MLP_NORM,
    PROJ,
    QKV,
    layer_param_name,
    split_layer_name,
)
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.parallel.layers import derive_seed, normal_init

LAYER_TENSORS = LAYER_SUFFIXES
NORMS = NORM_SUFFIXES

# The paper's atomic operators, as rules for what the new tensors hold: copies or splits of
# existing weights (G_direct), zeros where the function must be kept (G_zero), fresh draws
# of the model's initialisation (G_random). G_learn (LiGO's learned expansion) is not done.
DIRECT, ZERO, RANDOM = "direct", "zero", "random"
FILLS = (DIRECT, ZERO, RANDOM)

layer_tensor_name = layer_param_name  # full state-dict name of tensor `name` in layer `layer`


def layer_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of one decoder layer, by its name inside the layer."""
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    n_q, n_kv = config.num_attention_heads, config.query_groups
    return {
        INPUT_NORM: (h,),
        QKV: ((n_q + 2 * n_kv) * d, h),
        PROJ: (h, n_q * d),
        PRE_MLP_NORM: (h,),
        FC1: (2 * ffn, h),
        FC2: (h, ffn),
    }


def _is_norm(full_name: str) -> bool:
    return full_name.endswith("norm.weight")


def init_tensor(full_name: str, shape: Sequence[int], config: ModelConfig, seed: int) -> torch.Tensor:
    """The float32 value LlamaModel(config, seed=seed) gives tensor `full_name` of this (full) shape."""
    if _is_norm(full_name):
        return torch.ones(tuple(shape))
    std = config.init_method_std
    if full_name in (EMBEDDING, OUTPUT_LAYER):
        # A tied head is drawn from the embedding's seed; padding rows past the vocabulary stay zero.
        key = EMBEDDING if full_name == EMBEDDING or config.tie_embeddings else OUTPUT_LAYER
        tensor = torch.zeros(tuple(shape))
        normal_init(std, derive_seed(seed, key))(tensor[:config.vocab_size])
        return tensor
    layer = split_layer_name(full_name)
    if layer is None:
        raise KeyError(f"{full_name!r} is not a tensor of a Llama state dict")
    if layer[1] in OUTPUT_PROJECTIONS:
        std = std / math.sqrt(2.0 * config.num_layers)
    tensor = torch.empty(tuple(shape))
    normal_init(std, derive_seed(seed, full_name))(tensor)
    return tensor


def check_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Raise UserError unless `state_dict` is the full state dict of a model with this config."""
    expected = {layer_tensor_name(n, name): shape
                for n in range(config.num_layers) for name, shape in layer_tensor_shapes(config).items()}
    expected[FINAL_NORM] = (config.hidden_size,)
    vocab_names = [EMBEDDING] if config.tie_embeddings else [EMBEDDING, OUTPUT_LAYER]
    missing = sorted((set(expected) | set(vocab_names)) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(vocab_names))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"state dict does not match the model config ({config.num_layers} layers, "
                        f"tie_embeddings={config.tie_embeddings}): {detail}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise UserError(f"state dict tensor {name} has shape {tuple(state_dict[name].shape)}, the model config "
                            f"needs {shape}")
    for name in vocab_names:
        rows, columns = state_dict[name].shape
        if rows < config.vocab_size or columns != config.hidden_size:
            raise UserError(f"state dict tensor {name} has shape {(rows, columns)}, the model config needs "
                            f"at least {config.vocab_size} rows of {config.hidden_size}")
