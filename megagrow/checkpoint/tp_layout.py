"""How every weight of a LlamaModel state dict is split over tensor-parallel ranks.

The rules mirror the layers that own the weights (megagrow/parallel/layers.py and the model
docstrings) and are derived from ModelConfig alone, so a checkpoint can be split or merged
without building a model:

    embedding.weight, output_layer.weight   rows (vocabulary), padded to a multiple of
                                            make_vocab_size_divisible_by * tp with zero rows
    layers.N.attention.qkv.weight           rows, blocks [Wq; Wk; Wv] sharded on their own
    layers.N.mlp.gate_up.weight             rows, blocks [W_gate; W_up] sharded on their own
    layers.N.attention.dense.weight         columns (row-parallel input)
    layers.N.mlp.down.weight                columns (row-parallel input)
    norm weights                            replicated

Full tensors here carry the unpadded vocabulary; `split_for_tp` pads and `merge_from_tp`
drops the padding, which is zero by construction (never looked up, masked out of the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrow.config import ModelConfig, ParallelConfig, padded_vocab_size, validate_parallel
from megagrow.errors import UserError
from megagrow.parallel.layers import shard_blocks, unshard_blocks

VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")
REPLICATED_PARAMS = ("final_norm.weight",)
# Suffixes of the parameters of layer N, as registered under `layers.N.`.
LAYER_PARAM_SUFFIXES = (
    "input_norm.weight",
    "attention.qkv.weight",
    "attention.dense.weight",
    "post_attention_norm.weight",
    "mlp.gate_up.weight",
    "mlp.down.weight",
)


@dataclass(frozen=True)
class TPSplit:
    """Where a full tensor is cut over tp: `dim` (None = replicated) and the blocks sharded separately."""

    dim: int | None
    block_sizes: tuple[int, ...] = ()
    # Rows are the vocabulary: padded for the tp size before splitting.
    vocab: bool = False


def layer_param_name(layer: int, suffix: str) -> str:
    """Global state-dict name of one parameter of layer `layer`."""
    return f"layers.{layer}.{suffix}"


def parse_layer_param(name: str) -> tuple[int, str] | None:
    """(layer number, suffix) of a `layers.N.suffix` name, or None for the non-layer parameters."""
    if not name.startswith("layers."):
        return None
    number, _, suffix = name[len("layers."):].partition(".")
    if not number.isdigit() or suffix not in LAYER_PARAM_SUFFIXES:
        raise UserError(f"unknown parameter {name!r} in the checkpoint; it was not written by this megagrow version")
    return int(number), suffix


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
        raise UserError(f"unknown parameter {name!r} in the checkpoint; it was not written by this megagrow version")
    suffix = layer_param[1]
    if suffix.endswith("norm.weight"):
        return TPSplit(None)
    if suffix == "attention.qkv.weight":
        kv = config.query_groups * d
        return TPSplit(0, (config.num_attention_heads * d, kv, kv))
    if suffix == "attention.dense.weight":
        return TPSplit(1, (config.num_attention_heads * d,))
    if suffix == "mlp.gate_up.weight":
        return TPSplit(0, (ffn, ffn))
    assert suffix == "mlp.down.weight", suffix
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
