"""Activation recomputation (full and selective) gives the same loss and gradients, and really recomputes."""

import pytest
import torch

from distributed_harness import run_distributed
from megagrow.config import ModelConfig, ParallelConfig
from megagrow.errors import UserError
from megagrow.model import attention
from megagrow.model.llama import LlamaModel
from megagrow.parallel import state
from megagrow.parallel.layers import gather_full

CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=40, seq_length=12, make_vocab_size_divisible_by=8)


def _batch():
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(parallel=None, **options):
    """Loss [b, s] and every full (tp-gathered) gradient after one backward of the mean loss."""
    model = LlamaModel(CONFIG, parallel, seed=11, force_torch_kernels=True, **options)
    input_ids, labels = _batch()
    loss = model(input_ids, labels=labels)
    loss.mean().backward()
    return loss.detach(), {name: gather_full(p.grad, p) for name, p in model.named_parameters()}


def _assert_same(result, reference, exact=True):
    (loss, grads), (reference_loss, reference_grads) = result, reference
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, reference_loss, **tolerance)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_identical_loss_and_grads(granularity):
    # The recomputed forward runs the same kernels on the same inputs, so on the CPU the
    # results are bitwise equal, not merely close.
    _assert_same(_loss_and_grads(recompute_granularity=granularity), _loss_and_grads())


def _count_forwards(model, monkeypatch):
    calls = {"layer": 0, "core_attention": 0}
    original = attention.core_attention

    def counting_core_attention(*args):
        calls["core_attention"] += 1
        return original(*args)

    monkeypatch.setattr(attention, "core_attention", counting_core_attention)
    for layer in model.decoder.layers:
        # A pre-hook: checkpoint's recomputation stops early, once it has what backward
        # needs, so the layer's forward (post-)hooks never run the second time.
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
    input_ids, labels = _batch()
    model(input_ids, labels=labels).mean().backward()
    return calls


@pytest.mark.parametrize("granularity, layer_calls, attention_calls", [
    (None, 2, 2), ("full", 4, 4), ("selective", 2, 4),
])
def test_backward_runs_the_recomputed_part_again(granularity, layer_calls, attention_calls, monkeypatch):
    model = LlamaModel(CONFIG, seed=11, force_torch_kernels=True, recompute_granularity=granularity)
    assert _count_forwards(model, monkeypatch) == {"layer": layer_calls, "core_attention": attention_calls}


def test_no_recompute_without_autograd(monkeypatch):
    model = LlamaModel(CONFIG, seed=11, force_torch_kernels=True, recompute_granularity="full")
    input_ids, _ = _batch()
    with torch.no_grad():
        logits = model(input_ids)
    assert logits.shape == (2, CONFIG.seq_length, CONFIG.vocab_size)


def test_unknown_granularity_is_one_clear_error():
    with pytest.raises(UserError, match="--recompute-granularity 'block'"):
        LlamaModel(CONFIG, recompute_granularity="block")


def _tp2_worker():
    state.initialize(tp=2, pp=1, dp=1)
    try:
        parallel = ParallelConfig(tp=2, sequence_parallel=True)
        return (_loss_and_grads(parallel, recompute_granularity="full"), _loss_and_grads(parallel))
    finally:
        state.destroy()


def test_full_recompute_with_tensor_and_sequence_parallel():
    # Collectives inside the recomputed layers (sequence-parallel gathers, tp reductions) are
    # issued again in backward; every rank must still get the gradients of the plain run.
    for recomputed, plain in run_distributed(_tp2_worker, 2):
        _assert_same(recomputed, plain, exact=False)
