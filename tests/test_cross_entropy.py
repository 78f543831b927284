"""Vocab-parallel cross entropy against torch's F.cross_entropy, at tp=1 and tp=2, with padded vocabulary."""

import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from megagrow.parallel import state
from megagrow.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagrow.parallel.mappings import all_gather_tp

VOCAB, PADDED_VOCAB = 13, 16
SEQ, BATCH = 5, 3


def _inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(SEQ, BATCH, PADDED_VOCAB, generator=generator) * 3
    # Padding columns get the largest logits: they must still never be predicted.
    logits[..., VOCAB:] = 50.0
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    grad_weights = torch.rand(SEQ, BATCH, generator=generator)
    return logits, target, grad_weights


def _reference():
    logits, target, grad_weights = _inputs()
    real = logits[..., :VOCAB].clone().requires_grad_()
    loss = F.cross_entropy(real.reshape(-1, VOCAB), target.reshape(-1), reduction="none").view(SEQ, BATCH)
    (loss * grad_weights).sum().backward()
    return loss.detach(), real.grad


def _parallel_loss_and_grad():
    """Loss and the full logits grad, computed on this rank's vocabulary shard."""
    logits, target, grad_weights = _inputs()
    shard = logits.chunk(state.tp_size(), dim=-1)[state.tp_rank()].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, VOCAB)
    (loss * grad_weights).sum().backward()
    return loss.detach(), all_gather_tp(shard.grad, dim=-1)


def _worker():
    state.initialize(tp=2)
    try:
        return _parallel_loss_and_grad()
    finally:
        state.destroy()


def test_matches_torch_at_tp1_with_padding_never_winning():
    ref_loss, ref_grad = _reference()
    loss, grad = _parallel_loss_and_grad()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[..., :VOCAB], ref_grad, rtol=1e-6, atol=1e-6)
    assert torch.all(grad[..., VOCAB:] == 0)


def test_unpadded_matches_torch():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 7, generator=generator, requires_grad=True)
    target = torch.randint(0, 7, (4, 2), generator=generator)
    loss = vocab_parallel_cross_entropy(logits, target)
    reference = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), reduction="none").view(4, 2)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-6)


def test_matches_torch_at_tp2():
    ref_loss, ref_grad = _reference()
    for loss, grad in run_distributed(_worker, 2):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad[..., :VOCAB], ref_grad, rtol=1e-6, atol=1e-6)
        assert torch.all(grad[..., VOCAB:] == 0)
