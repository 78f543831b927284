"""Tensor-parallel layout of every weight: agrees with the layers' own attributes and with a real tp=2 model."""

import pytest
import torch

from distributed_harness import run_distributed
from megagrow.checkpoint.tp_layout import (
    full_shape,
    interleave_qkv,
    merge_from_tp,
    padded_vocab,
    split_for_tp,
    split_qkv,
    tp_split,
)
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.model.llama import LlamaModel
from megagrow.parallel import state

# 4 query heads over 2 kv heads, ffn not a multiple of the hidden size, vocab needing padding.
CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=50, seq_length=8, make_vocab_size_divisible_by=8)
SEED = 11


def _model_state(config: ModelConfig, tp: int) -> dict:
    state.initialize(tp=tp, pp=1, dp=1)
    try:
        model = LlamaModel(config, seed=SEED)
        layout = {name: (getattr(p, "tp_partition_dim", None), tuple(getattr(p, "tp_partition_sizes", ())))
                  for name, p in model.named_parameters()}
        return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "layout": layout}
    finally:
        state.destroy()


def _full_state(config: ModelConfig) -> dict:
    full = _model_state(config, 1)["state"]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full[name] = full[name][:config.vocab_size]
    return full


def test_layout_matches_the_layers_attributes():
    built = _model_state(CONFIG, 1)
    for name, (dim, sizes) in built["layout"].items():
        split = tp_split(name, CONFIG)
        assert split.dim == dim, name
        if dim is not None:
            assert ((padded_vocab(CONFIG, 1),) if split.vocab else split.block_sizes) == sizes, name
        unpadded = built["state"][name][:CONFIG.vocab_size] if split.vocab else built["state"][name]
        assert tuple(unpadded.shape) == full_shape(name, CONFIG), name


def test_split_gives_what_a_tp2_model_holds():
    ranks = run_distributed(_model_state, 2, CONFIG, 2)
    for name, full in _full_state(CONFIG).items():
        shards = split_for_tp(name, full, CONFIG, 2)
        for rank in range(2):
            assert torch.equal(shards[rank], ranks[rank]["state"][name]), (name, rank)
        assert torch.equal(merge_from_tp(name, [r["state"][name] for r in ranks], CONFIG), full), name


@pytest.mark.parametrize("tp", [1, 2])
def test_split_then_merge_is_identity_with_zero_vocab_padding(tp):
    for name, full in _full_state(CONFIG).items():
        shards = split_for_tp(name, full, CONFIG, tp)
        assert len(shards) == tp
        assert torch.equal(merge_from_tp(name, shards, CONFIG), full), name
    name = "embedding.word_embeddings.weight"
    shards = split_for_tp(name, _full_state(CONFIG)[name], CONFIG, tp)
    padded = torch.cat(shards)
    assert padded.size(0) == padded_vocab(CONFIG, tp) == 8 * tp * -(-50 // (8 * tp))
    assert not padded[CONFIG.vocab_size:].any()


def test_qkv_is_split_by_whole_query_groups_and_fc1_by_blocks():
    # linear_qkv rows are grouped per query group (2 q heads, k, v): rank r holds whole groups.
    d, name = CONFIG.head_dim, "decoder.layers.0.self_attention.linear_qkv.weight"
    full = torch.arange(8 * d, dtype=torch.float32)[:, None].expand(8 * d, CONFIG.hidden_size).clone()
    rank1 = split_for_tp(name, full, CONFIG, 2)[1][:, 0].long().tolist()
    assert rank1 == list(range(4 * d, 8 * d))
    # linear_fc1 is [gate; up]: rank r holds its slice of the gate rows, then of the up rows.
    name, ffn = "decoder.layers.0.mlp.linear_fc1.weight", CONFIG.ffn_hidden_size
    full = torch.arange(2 * ffn, dtype=torch.float32)[:, None].expand(2 * ffn, CONFIG.hidden_size).clone()
    rank1 = split_for_tp(name, full, CONFIG, 2)[1][:, 0].long().tolist()
    assert rank1 == list(range(ffn // 2, ffn)) + list(range(ffn + ffn // 2, 2 * ffn))


def test_qkv_interleaving_round_trips_and_groups_heads():
    d, n_q, n_kv = CONFIG.head_dim, CONFIG.num_attention_heads, CONFIG.query_groups
    q, k, v = (torch.randn(n * d, CONFIG.hidden_size) for n in (n_q, n_kv, n_kv))
    qkv = interleave_qkv(q, k, v, CONFIG)
    per_group = n_q // n_kv
    # Group 1 holds query heads 2 and 3, then kv head 1's k and v rows.
    group = qkv[(per_group + 2) * d:2 * (per_group + 2) * d]
    assert torch.equal(group[:per_group * d], q[per_group * d:2 * per_group * d])
    assert torch.equal(group[per_group * d:(per_group + 1) * d], k[d:2 * d])
    assert torch.equal(group[(per_group + 1) * d:], v[d:2 * d])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, CONFIG), (q, k, v)))


def test_bad_shapes_and_splits_fail_with_one_line():
    full = _full_state(CONFIG)
    with pytest.raises(UserError, match="does not match the model config"):
        split_for_tp("decoder.layers.0.mlp.linear_fc2.weight", full["decoder.layers.0.mlp.linear_fc2.weight"].t(),
                     CONFIG, 2)
    with pytest.raises(UserError, match="num_query_groups 2 is not divisible by tensor-parallel size 4"):
        qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
        split_for_tp(qkv, full[qkv], CONFIG, 4)
    fc1 = "decoder.layers.1.mlp.linear_fc1.weight"
    shards = split_for_tp(fc1, full[fc1], CONFIG, 2)
    with pytest.raises(UserError, match="tp rank 1 holds 40 channels"):
        merge_from_tp(fc1, [shards[0], shards[1][:40]], CONFIG)
    with pytest.raises(UserError, match="unknown parameter"):
        tp_split("decoder.layers.0.self_attention.linear_qkv.bias", CONFIG)
