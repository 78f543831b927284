"""Width growth by an integer factor k: of the FFN only, or of the whole model.

Scopes:
    ffn  the FFN width ffn -> k*ffn; hidden size and heads unchanged.
    all  hidden h -> k*h, query heads n_q -> k*n_q, key/value heads n_kv -> k*n_kv, FFN
         ffn -> k*ffn. The head dimension stays: RoPE's frequencies depend on it, so
         widening heads instead of adding them could not keep the function.

Every grown axis is laid out block by block: a block of size s becomes one of size k*s whose
first s positions are the old ones and whose position j reads old position j mod s. The
blocks are the fused parts (the q, k, v heads of linear_qkv, grown as separate [Wq; Wk; Wv]
blocks and regrouped per query group afterwards; gate and up of linear_fc1), so the grown
tensors keep the layout the model and the tensor-parallel shards expect, and grouped-query
attention stays consistent: new query head t*n_q + i reads key/value head
(t*n_q + i) // (n_q/n_kv) = t*n_kv + i // (n_q/n_kv), the copy of the head old head i read.

Fills (the paper's atomic operators; its width-wise G_direct is Net2Net / bert2BERT-style neuron
splitting, as in the authors' code, github.com/tongxuluo/prts, prts_lit/scaling/bert2bert.py):

    direct  neuron splitting. Output axes are tiled (each unit copied k times); input axes
            ("fan-in", summed over by a matmul) are tiled and divided by k, so each consumer
            sees sum over k copies of x * w/k = x * w. For SwiGLU this is exact because the
            activation is elementwise. For RMSNorm it is exact too, but only because every
            hidden channel is copied the same number of times: the mean of x^2 over k
            copies of every channel equals the mean over the original channels, so the
            norm's statistic is unchanged (a partial, uneven split would change it). With
            tied embeddings the embedding cannot be both tiled (as the input lookup) and
            divided (as the head), so the final norm's weight is divided by k instead.
            (The authors' code picks the channels to copy, from the left or at random, and
            divides by each one's repeat count; when copies are uneven, as with random picks
            or a non-integer factor, RMSNorm's statistic changes and so does the function.)
            Caveat: exact copies receive identical gradients, so training never makes them
            differ; breaking the symmetry (noise, bert2BERT's AKI) is left to the caller.
    zero    new units start silent, the function is kept: every new slice of a tensor that
            writes the residual stream (embedding, attention dense, MLP down) is zero, so
            new hidden channels stay exactly zero and new heads or FFN neurons add nothing;
            new slices of tensors that read (qkv, gate/up, head) are drawn from the model's
            initialisation so gradients reach the new units (zero on both sides would be a
            saddle with zero gradient). FFN scope: exact. Scope all: the wider RMSNorm
            averages x^2 over k*h channels of which (k-1)*h are zero, dividing the mean by
            k; the norm weights are multiplied by 1/sqrt(k) to undo that, which is exact
            except for eps: the grown norm behaves as if eps were k*eps, a relative change
            of about (k-1)*eps / (2 * mean(x^2)) in each normalised activation. Exact only
            as eps -> 0 (tested both ways); changing norm_eps in the config would make it
            exact but would then differ from the flags a user continues training with.
    random  every new slice is drawn from the grown model's initialisation (norms: ones),
            old values are kept in their positions. Not function preserving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from megagrow.checkpoint.tp_layout import interleave_qkv, split_qkv
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.tensors import (
    DIRECT,
    EMBEDDING,
    FC1,
    FC2,
    FILLS,
    FINAL_NORM,
    OUTPUT_LAYER,
    PROJ,
    QKV,
    ZERO,
    check_state_dict,
    init_tensor,
    split_layer_name,
)

FFN, ALL = "ffn", "all"
SCOPES = (FFN, ALL)
# Tensors that add into the residual stream: their new slices are zero under the zero fill.
_RESIDUAL_WRITERS = (EMBEDDING, PROJ, FC2)


@dataclass(frozen=True)
class _Axis:
    """One dimension of a tensor: its old blocks, whether it grows, whether a matmul sums over it."""

    blocks: tuple[int, ...]
    grows: bool = False
    fan_in: bool = False


def grown_width_config(config: ModelConfig, factor: int, scope: str) -> ModelConfig:
    """The config after width growth by `factor` in `scope`."""
    if scope not in SCOPES:
        raise UserError(f"width scope {scope!r} is not one of {', '.join(SCOPES)}")
    if factor < 2:
        raise UserError(f"width growth factor must be at least 2, got {factor}")
    if scope == FFN:
        return config.replace(ffn_hidden_size=config.ffn_hidden_size * factor)
    groups = None if config.num_query_groups is None else config.num_query_groups * factor
    return config.replace(hidden_size=config.hidden_size * factor,
                          num_attention_heads=config.num_attention_heads * factor,
                          num_query_groups=groups, ffn_hidden_size=config.ffn_hidden_size * factor)


def _axes(local_name: str, rows: int, config: ModelConfig, scope: str) -> tuple[_Axis, ...]:
    """How each dimension of a tensor (name inside a layer, or a top-level name) grows."""
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    n_q, n_kv = config.num_attention_heads, config.query_groups
    wide = scope == ALL
    if local_name.endswith("norm.weight"):
        return (_Axis((h,), grows=wide),)
    if local_name == EMBEDDING:
        return _Axis((rows,)), _Axis((h,), grows=wide)
    if local_name == OUTPUT_LAYER:
        return _Axis((rows,)), _Axis((h,), grows=wide, fan_in=True)
    if local_name == QKV:
        return _Axis((n_q * d, n_kv * d, n_kv * d), grows=wide), _Axis((h,), grows=wide, fan_in=True)
    if local_name == PROJ:
        return _Axis((h,), grows=wide), _Axis((n_q * d,), grows=wide, fan_in=True)
    if local_name == FC1:
        return _Axis((ffn, ffn), grows=True), _Axis((h,), grows=wide, fan_in=True)
    if local_name == FC2:
        return _Axis((h,), grows=wide), _Axis((ffn,), grows=True, fan_in=True)
    raise KeyError(f"{local_name!r} is not a tensor of a Llama state dict")


def _source_index(axis: _Axis, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position of the grown axis: the old position it reads, and whether it is that old position itself."""
    if not axis.grows:
        size = sum(axis.blocks)
        return torch.arange(size), torch.ones(size, dtype=torch.bool)
    sources, is_old, offset = [], [], 0
    for size in axis.blocks:
        position = torch.arange(factor * size)
        sources.append(offset + position % size)
        is_old.append(position < size)
        offset += size
    return torch.cat(sources), torch.cat(is_old)


def _as_blocks(qkv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return torch.cat(split_qkv(qkv, config))  # per-group rows -> [Wq; Wk; Wv]


def _as_groups(blocks: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    q, k, v = blocks.split([config.num_attention_heads * d, config.query_groups * d, config.query_groups * d])
    return interleave_qkv(q, k, v, config)


def grow_width_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, factor: int, scope: str, fill: str,
                      seed: int) -> torch.Tensor:
    """One tensor of a full state dict grown in width; `config` is the model before growth."""
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}")
    split = split_layer_name(name)
    local_name = name if split is None else split[1]
    if local_name == QKV and scope == ALL:
        # The q, k and v heads grow as three blocks; the per-group row order is restored after.
        grown = _grow_width(name, _as_blocks(tensor, config), local_name, config, factor, scope, fill, seed)
        return _as_groups(grown, grown_width_config(config, factor, scope))
    return _grow_width(name, tensor, local_name, config, factor, scope, fill, seed)


def _grow_width(name: str, tensor: torch.Tensor, local_name: str, config: ModelConfig, factor: int, scope: str,
                fill: str, seed: int) -> torch.Tensor:
    axes = _axes(local_name, tensor.shape[0], config, scope)
    if not any(axis.grows for axis in axes):
        return tensor.clone()
    indices = [_source_index(axis, factor) for axis in axes]
    hidden_grows = scope == ALL
    is_norm = local_name.endswith("norm.weight")

    if fill == DIRECT:
        grown = tensor.float()
        for dim, (axis, (source, _)) in enumerate(zip(axes, indices)):
            if axis.grows:
                grown = grown.index_select(dim, source)
                if axis.fan_in:
                    grown = grown / factor
        if name == FINAL_NORM and hidden_grows and config.tie_embeddings:
            grown = grown / factor  # the tied head sees a tiled, undivided embedding
        return grown.to(tensor.dtype)

    grown_config = grown_width_config(config, factor, scope)
    shape = tuple(len(source) for source, _ in indices)
    if fill == ZERO and local_name in _RESIDUAL_WRITERS:
        grown = torch.zeros(shape)
    else:
        grown = init_tensor(name, shape, grown_config, seed)
        if local_name == QKV:
            grown = _as_blocks(grown, grown_config)  # the model's draw, in the block order used here
    old_positions = [is_old.nonzero().squeeze(1) for _, is_old in indices]
    if len(shape) == 1:
        grown[old_positions[0]] = tensor.float()
    else:
        grown[old_positions[0][:, None], old_positions[1][None, :]] = tensor.float()
    if fill == ZERO and is_norm and hidden_grows:
        grown = grown / math.sqrt(factor)  # mean(x^2) now runs over k*h channels, (k-1)*h of them zero
    return grown.to(tensor.dtype)


def grow_width(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, factor: int, scope: str, fill: str,
               seed: int) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Grow a full state dict in width; returns the grown state dict and config."""
    check_state_dict(dict(state_dict), config)
    grown = grown_width_config(config, factor, scope)
    result = {name: grow_width_tensor(name, tensor, config, factor, scope, fill, seed)
              for name, tensor in state_dict.items()}
    return result, grown
