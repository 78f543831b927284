"""How every weight of a full Llama state dict is split over tensor-parallel ranks, as megatron-core splits it.

The rules mirror the layers that own the weights (megagrow/parallel/layers.py and the model
docstrings) and are derived from ModelConfig alone, so a checkpoint can be split or merged
without building a model (names: megagrow/checkpoint/names.py):

    embedding.word_embeddings.weight,   rows (vocabulary), padded to a multiple of
    output_layer.weight                 make_vocab_size_divisible_by * tp
    ….self_attention.linear_qkv.weight  rows, contiguous: whole query groups per rank
    ….mlp.linear_fc1.weight             rows, blocks [W_gate; W_up] sharded on their own
    ….self_attention.linear_proj.weight columns (row-parallel input)
    ….mlp.linear_fc2.weight             columns (row-parallel input)
    norm weights                        replicated

Full tensors here carry the unpadded vocabulary; `split_for_tp` pads and `merge_from_tp`
drops the padding. `interleave_qkv` and `split_qkv` convert between the grouped
`linear_qkv` rows and separate q, k, v matrices (HF's q_proj, k_proj, v_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrow.checkpoint import names
from megagrow.config import ModelConfig, ParallelConfig, padded_vocab_size, validate_parallel
from megagrow.errors import UserError
from megagrow.parallel.layers import shard_blocks, unshard_blocks

VOCAB_PARAMS = (names.EMBEDDING, names.OUTPUT_LAYER)
REPLICATED_PARAMS = (names.FINAL_NORM,)


@dataclass(frozen=True)
class TPSplit:
    """Where a full tensor is cut over tp: `dim` (None = replicated) and the blocks sharded separately."""

    dim: int | None
    block_sizes: tuple[int, ...] = ()
    # Rows are the vocabulary: padded for the tp size before splitting.
    vocab: bool = False


def parse_layer_param(name: str) -> tuple[int, str] | None:
    """(layer number, suffix) of a layer parameter, None for the non-layer parameters; refuses unknown names."""
    parsed = names.split_layer_name(name)
    if parsed is None and name not in VOCAB_PARAMS + REPLICATED_PARAMS:
        raise UserError(f"unknown parameter {name!r} in the checkpoint; megagrow reads Llama GPT models only")
    if parsed is not None and parsed[1] not in names.LAYER_SUFFIXES:
        raise UserError(f"unknown parameter {name!r} in the checkpoint; megagrow reads Llama GPT models only")
    return parsed


def tp_split(name: str, config: ModelConfig) -> TPSplit:
    """The tensor-parallel split of parameter `name` of a model with `config`."""
    d = config.head_dim
    ffn = config.ffn_hidden_size
    if name in VOCAB_PARAMS:
        return TPSplit(0, vocab=True)
    if name in REPLICATED_PARAMS:
        return TPSplit(None)
    layer_param = parse_layer_param(name)
    if layer_param is None:
        raise UserError(f"unknown parameter {name!r} in the checkpoint; megagrow reads Llama GPT models only")
    suffix = layer_param[1]
    if suffix in names.NORM_SUFFIXES:
        return TPSplit(None)
    if suffix == names.QKV:
        return TPSplit(0, ((config.num_attention_heads + 2 * config.query_groups) * d,))
    if suffix == names.PROJ:
        return TPSplit(1, (config.num_attention_heads * d,))
    if suffix == names.FC1:
        return TPSplit(0, (ffn, ffn))
    assert suffix == names.FC2, suffix
    return TPSplit(1, (ffn,))


def full_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """Shape of the full (unsharded, unpadded) tensor `name`."""
    h = config.hidden_size
    split = tp_split(name, config)
    if split.vocab:
        return (config.vocab_size, h)
    if split.dim is None:
        return (h,)
    size = sum(split.block_sizes)
    return (size, h) if split.dim == 0 else (h, size)


def shard_shape(name: str, config: ModelConfig, tp: int) -> tuple[int, ...]:
    """Shape of one tp rank's shard of parameter `name` (vocabulary rows padded for `tp`)."""
    split = tp_split(name, config)
    shape = list(full_shape(name, config))
    if split.vocab:
        shape[0] = padded_vocab(config, tp)
    if split.dim is not None:
        shape[split.dim] //= tp
    return tuple(shape)


def padded_vocab(config: ModelConfig, tp: int) -> int:
    """Rows of the vocabulary matrices in a checkpoint of tensor-parallel size `tp`."""
    return padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp)


def split_for_tp(name: str, full: torch.Tensor, config: ModelConfig, tp: int) -> list[torch.Tensor]:
    """The `tp` shards of full tensor `name`, in tp-rank order (replicated tensors are repeated)."""
    split = tp_split(name, config)
    # Checked in heads, not channels: a split inside a head would still divide the rows evenly.
    validate_parallel(config, ParallelConfig(tp=tp))
    if tuple(full.shape) != full_shape(name, config):
        raise UserError(f"{name}: shape {tuple(full.shape)} does not match the model config "
                        f"(expected {full_shape(name, config)}); the weights and config disagree")
    if split.dim is None:
        return [full.clone() for _ in range(tp)]
    block_sizes = split.block_sizes
    if split.vocab:
        rows = padded_vocab(config, tp)
        padding = full.new_zeros((rows - full.size(0), *full.shape[1:]))
        full, block_sizes = torch.cat([full, padding]), (rows,)
    return [shard_blocks(full, block_sizes, split.dim, tp, rank).contiguous() for rank in range(tp)]


def merge_from_tp(name: str, shards: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The full tensor `name` from its shards in tp-rank order (the inverse of `split_for_tp`)."""
    split = tp_split(name, config)
    tp = len(shards)
    if split.dim is None:
        return shards[0].clone()
    block_sizes = (padded_vocab(config, tp),) if split.vocab else split.block_sizes
    local = [size // tp for size in block_sizes]
    for rank, shard in enumerate(shards):
        if shard.size(split.dim) != sum(local):
            raise UserError(f"{name}: tp rank {rank} holds {shard.size(split.dim)} channels along dim {split.dim}, "
                            f"expected {sum(local)} for tp={tp}; the shards come from different models or layouts")
    full = unshard_blocks(shards, block_sizes, split.dim)
    return full[:config.vocab_size].clone() if split.vocab else full


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig,
                   groups: int | None = None) -> torch.Tensor:
    """linear_qkv rows from separate q [n_q d, h], k and v [n_kv d, h]: per query group its q heads, k, v.

    `groups` is the number of query groups the tensors hold (a tp shard holds n_kv / tp).
    """
    d, per_group = config.head_dim, config.num_attention_heads // config.query_groups
    groups = groups or config.query_groups
    q = q.reshape(groups, per_group * d, -1)
    return torch.cat([q, k.reshape(groups, d, -1), v.reshape(groups, d, -1)], dim=1).reshape(-1, q.size(-1))


def split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [n_q d, h], k [n_kv d, h], v [n_kv d, h]) from linear_qkv rows (the inverse of interleave_qkv)."""
    groups, d = config.query_groups, config.head_dim
    per_group = config.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, -1)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, qkv.size(-1)).contiguous() for t in (q, k, v))
