"""Names, shapes and initial values of the tensors in a full (unsharded) Llama state dict.

The growth operators work on the state dict of a tp=1, pp=1 LlamaModel, which is the full
state dict of any layout:

    embedding.weight                        [padded_vocab, h]
    layers.N.input_norm.weight              [h]
    layers.N.attention.qkv.weight           [(n_q + 2 n_kv) d, h]   rows [Wq; Wk; Wv]
    layers.N.attention.dense.weight         [h, n_q d]
    layers.N.post_attention_norm.weight     [h]
    layers.N.mlp.gate_up.weight             [2 ffn, h]              rows [W_gate; W_up]
    layers.N.mlp.down.weight                [h, ffn]
    final_norm.weight                       [h]
    output_layer.weight                     [padded_vocab, h]       absent when tied

`init_tensor` reproduces what LlamaModel(config, seed=seed) draws for one of these, so a
new layer or a new slice made by a growth operator is exactly the model's own initialisation
(tests/test_growth_operators.py checks it against a freshly built model).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.model.llama import EMBEDDING_INIT_KEY
from megagrow.parallel.layers import derive_seed, normal_init

EMBEDDING = "embedding.weight"
FINAL_NORM = "final_norm.weight"
OUTPUT_LAYER = "output_layer.weight"

INPUT_NORM = "input_norm.weight"
QKV = "attention.qkv.weight"
DENSE = "attention.dense.weight"
POST_ATTENTION_NORM = "post_attention_norm.weight"
GATE_UP = "mlp.gate_up.weight"
DOWN = "mlp.down.weight"
LAYER_TENSORS = (INPUT_NORM, QKV, DENSE, POST_ATTENTION_NORM, GATE_UP, DOWN)
NORMS = (INPUT_NORM, POST_ATTENTION_NORM)
# Projections that write into the residual stream; initialised with std / sqrt(2 * num_layers).
OUTPUT_PROJECTIONS = (DENSE, DOWN)

# The paper's atomic operators, as rules for what the new tensors hold: copies or splits of
# existing weights (G_direct), zeros where the function must be kept (G_zero), fresh draws
# of the model's initialisation (G_random). G_learn (LiGO's learned expansion) is not done.
DIRECT, ZERO, RANDOM = "direct", "zero", "random"
FILLS = (DIRECT, ZERO, RANDOM)

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def layer_tensor_name(layer: int, name: str) -> str:
    """Full state-dict name of tensor `name` (e.g. 'mlp.down.weight') in layer `layer`."""
    return f"layers.{layer}.{name}"


def split_layer_name(full_name: str) -> tuple[int, str] | None:
    """(layer number, name inside the layer) for a layer tensor; None for embedding, final norm and head."""
    match = _LAYER_NAME.match(full_name)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of one decoder layer, by its name inside the layer."""
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    n_q, n_kv = config.num_attention_heads, config.query_groups
    return {
        INPUT_NORM: (h,),
        QKV: ((n_q + 2 * n_kv) * d, h),
        DENSE: (h, n_q * d),
        POST_ATTENTION_NORM: (h,),
        GATE_UP: (2 * ffn, h),
        DOWN: (h, ffn),
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
        key = EMBEDDING_INIT_KEY if full_name == EMBEDDING or config.tie_embeddings else OUTPUT_LAYER
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
