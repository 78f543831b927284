"""The chunked head + cross entropy equals the all-at-once loss and gradients, at tp=1 and tp=2."""

import pytest
import torch

from distributed_harness import run_distributed
from megagrow.config import ModelConfig, ParallelConfig
from megagrow.errors import UserError
from megagrow.model.llama import LlamaModel
from megagrow.parallel import state
from megagrow.parallel.layers import gather_full

CONFIG = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=50, seq_length=12, make_vocab_size_divisible_by=8)
# Norm-wise: the head's weight grad is summed chunk by chunk instead of in one matmul.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _run(parallel=None, chunk_size=None, tie_embeddings=False):
    """Loss [b, s] and full (tp-gathered) gradients of one backward of the mean loss."""
    config = CONFIG.replace(tie_embeddings=tie_embeddings)
    model = LlamaModel(config, parallel, seed=5, force_torch_kernels=True, cross_entropy_chunk_size=chunk_size)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.mean().backward()
    return loss.detach(), {name: gather_full(p.grad, p) for name, p in model.named_parameters()}


def _assert_same(result, reference):
    torch.testing.assert_close(result[0], reference[0], **TOLERANCE)
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, **TOLERANCE, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 36, 1000])  # 36 tokens: one token, ragged, exact, one chunk
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_loss_matches_unchunked(chunk_size, tie_embeddings):
    _assert_same(_run(chunk_size=chunk_size, tie_embeddings=tie_embeddings), _run(tie_embeddings=tie_embeddings))


def test_zero_turns_chunking_off():
    model = LlamaModel(CONFIG, cross_entropy_chunk_size=0)
    assert model.cross_entropy_chunk_size is None


def test_negative_chunk_size_is_one_clear_error():
    with pytest.raises(UserError, match="--cross-entropy-chunk-size -4"):
        LlamaModel(CONFIG, cross_entropy_chunk_size=-4)


def _tp2_worker():
    state.initialize(tp=2, pp=1, dp=1)
    try:
        return [(_run(ParallelConfig(tp=2, sequence_parallel=sp), chunk_size=5),
                 _run(ParallelConfig(tp=2, sequence_parallel=sp))) for sp in (False, True)]
    finally:
        state.destroy()


def test_chunked_loss_with_vocab_and_sequence_parallel():
    # Against the unchunked tp=2 run; that one equals tp=1 by tests/test_tensor_parallel.py.
    for rank_results in run_distributed(_tp2_worker, 2):
        for chunked, plain in rank_results:
            _assert_same(chunked, plain)


def _keeps_logits_of_every_token(chunk_size):
    """Whether autograd keeps, for backward, a [tokens, vocab]-shaped tensor (logits, softmax or log-softmax)."""
    model = LlamaModel(CONFIG, seed=5, force_torch_kernels=True, cross_entropy_chunk_size=chunk_size)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(1))
    vocabulary_widths = {CONFIG.vocab_size, model.padded_vocab_size}
    found = []

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.size(-1) in vocabulary_widths:
            found.append(tensor.numel() // tensor.size(-1) == 3 * CONFIG.seq_length)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens[:, :-1], labels=tokens[:, 1:])
    return any(found)


def test_chunking_keeps_no_full_vocabulary_activation():
    assert _keeps_logits_of_every_token(None)
    assert not _keeps_logits_of_every_token(5)  # checkpointed chunks keep only their inputs
