"""tp=2 and tp=4 (and tp=2 x dp=2), with and without sequence parallelism, give the tp=1 logits, loss and grads.

The tp=1 reference runs in this process without torch.distributed; each tp size runs once in
gloo workers (all variants inside one spawn, to keep the suite fast). Tensors are compared
after gathering shards into full tensors, with a norm-wise relative tolerance of 1e-5.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distributed_harness import run_distributed
from megagrow.config import ModelConfig, ParallelConfig
from megagrow.model.llama import LlamaModel
from megagrow.parallel import mappings, state
from megagrow.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_full,
    normal_init,
    shard_blocks,
    sync_sequence_parallel_grads,
    unshard_blocks,
)

CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                     vocab_size=100, seq_length=16, make_vocab_size_divisible_by=8)
BATCH = 2
# (sequence_parallel, tie_embeddings)
VARIANTS = [(False, False), (True, False), (True, True)]
RELATIVE_TOLERANCE = 1e-5


def _tokens():
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, CONFIG.seq_length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and grad gathered over tp, vocabulary padding dropped."""
    out = {}
    for name, param in model.named_parameters():
        weight, grad = gather_full(param, param), gather_full(param.grad, param)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            weight, grad = weight[:CONFIG.vocab_size], grad[:CONFIG.vocab_size]
        out[name], out[f"{name}.grad"] = weight, grad
    return out


def _model_run(sequence_parallel: bool, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    config = CONFIG.replace(tie_embeddings=tie_embeddings)
    parallel = ParallelConfig(tp=state.tp_size(), dp=state.dp_size(), sequence_parallel=sequence_parallel)
    model = LlamaModel(config, parallel, seed=42, force_torch_kernels=True)
    input_ids, labels = _tokens()
    logits = model(input_ids)
    loss = model(input_ids, labels=labels)
    loss.mean().backward()
    sync_sequence_parallel_grads(model)
    return {"logits": logits.detach(), "loss": loss.detach(), **_full_tensors(model)}


def _layer_run() -> dict[str, torch.Tensor]:
    """The layer options the model does not use: gathered column output, row input scattered inside."""
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    column = ColumnParallelLinear(16, 8, bias=True, gather_output=True, init_method=normal_init(0.5, 1))
    row = RowParallelLinear(8, 16, bias=True, input_is_parallel=False, init_method=normal_init(0.5, 2))
    y = row(torch.tanh(column(x)))
    (y * y).sum().backward()
    out = {"output": y.detach(), "x.grad": x.grad}
    for prefix, layer in (("column", column), ("row", row)):
        for name, param in layer.named_parameters():
            out[f"{prefix}.{name}.grad"] = gather_full(param.grad, param)
    return out


def _mapping_run() -> dict[str, torch.Tensor]:
    """Each communication op inside a round trip that is the identity at any tp, values and grads."""
    tp = state.tp_size()
    round_trips = {
        "copy-reduce": lambda x: mappings.reduce_from_tp_region(mappings.copy_to_tp_region(x) / tp),
        "scatter-gather": lambda x: mappings.gather_from_tp_region(mappings.scatter_to_tp_region(x)),
        "sequence-scatter-gather": lambda x: mappings.gather_from_sequence_parallel_region(
            mappings.scatter_to_sequence_parallel_region(x), grad_is_partial=False),
        "sequence-reduce-scatter-gather": lambda x: mappings.gather_from_sequence_parallel_region(
            mappings.reduce_scatter_to_sequence_parallel_region(x / tp)),
    }
    generator = torch.Generator().manual_seed(4)
    out = {}
    for name, round_trip in round_trips.items():
        x = torch.randn(8, 2, 12, generator=generator, requires_grad=True)
        weights = torch.randn(8, 2, 12, generator=generator)
        y = round_trip(x)
        (y * weights).sum().backward()
        out[f"{name}.output"], out[f"{name}.grad"] = y.detach(), x.grad
    return out


def _all_runs() -> dict:
    return {"layers": _layer_run(), "mappings": _mapping_run(),
            **{variant: _model_run(*variant) for variant in VARIANTS}}


def _tensor_parallel_worker(tp: int, dp: int):
    state.initialize(tp=tp, pp=1, dp=dp)
    try:
        runs = _all_runs()
        return runs if state.tp_rank() == 0 else None
    finally:
        state.destroy()


@pytest.fixture(scope="module")
def reference():
    return _all_runs()


@pytest.fixture(scope="module", params=[(2, 1), (4, 1), (2, 2)], ids=["tp2", "tp4", "tp2-dp2"])
def parallel_runs(request):
    """The runs of tp rank 0 in every data-parallel replica."""
    tp, dp = request.param
    results = run_distributed(_tensor_parallel_worker, tp * dp, tp, dp)
    return [runs for runs in results if runs is not None]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    assert error <= RELATIVE_TOLERANCE, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("part", ["mappings", "layers"])
def test_mappings_and_layer_options_match_tp1(reference, parallel_runs, part):
    for runs in parallel_runs:
        for name, expected in reference[part].items():
            _assert_close(runs[part][name], expected, name)


@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "sequence-parallel", "sequence-parallel-tied"])
def test_llama_matches_tp1(reference, parallel_runs, variant):
    expected = reference[variant]
    for runs in parallel_runs:
        actual = runs[variant]
        assert set(actual) == set(expected)
        for name in expected:
            _assert_close(actual[name], expected[name], name)
    # The check must not pass vacuously: every weight received a gradient.
    assert all(expected[name].abs().sum() > 0 for name in expected if name.endswith(".grad"))


@settings(max_examples=50, deadline=None)
@given(blocks=st.lists(st.integers(1, 3), min_size=1, max_size=3), tp=st.sampled_from([1, 2, 4]),
       dim=st.sampled_from([0, 1]))
def test_block_sharding_round_trips(blocks, tp, dim):
    block_sizes = [size * tp for size in blocks]
    shape = [sum(block_sizes), 3] if dim == 0 else [3, sum(block_sizes)]
    full = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    shards = [shard_blocks(full, block_sizes, dim, tp, rank) for rank in range(tp)]
    assert all(shard.size(dim) == sum(block_sizes) // tp for shard in shards)
    # Rank r holds the r-th slice of every block, in block order.
    first_block = full.narrow(dim, 0, block_sizes[0])
    assert torch.equal(shards[-1].narrow(dim, 0, blocks[0]), first_block.chunk(tp, dim=dim)[-1])
    assert torch.equal(unshard_blocks(shards, block_sizes, dim), full)


def test_vocabulary_padding_rows_start_at_zero():
    model = LlamaModel(CONFIG, seed=1, force_torch_kernels=True)
    assert model.padded_vocab_size == 104
    for weight in (model.embedding.word_embeddings.weight, model.output_layer.weight):
        assert torch.all(weight[CONFIG.vocab_size:] == 0) and torch.all(weight[:CONFIG.vocab_size].abs().sum(1) > 0)
