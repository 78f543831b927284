"""Entropy proxies: known distributions, the chain rule, document boundaries, the sample and the mixture."""

import math
from collections import Counter

import numpy as np
import pytest
from data_factory import random_documents, write_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from megagrow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megagrow.mixing.entropy import (
    TokenSample,
    dataset_entropies,
    estimate_entropies,
    mixture_from_entropies,
    token_sample,
)


def sample_of(documents) -> TokenSample:
    """A TokenSample holding `documents` back to back, in order."""
    documents = [np.asarray(d, dtype=np.int64) for d in documents if len(d)]
    lengths = [len(d) for d in documents]
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return TokenSample(np.concatenate(documents), starts)


def reference_entropies(documents) -> tuple[float, float, float]:
    """(H(X_t), H(X_{t+1}|X_t), H(X_t, X_{t+1})) by counting pairs in dictionaries, straight from the definitions."""
    pairs = Counter()
    for doc in documents:
        pairs.update(zip(map(int, doc[:-1]), map(int, doc[1:])))
    total = sum(pairs.values())
    firsts = Counter()
    for (a, _), c in pairs.items():
        firsts[a] += c
    joint = -sum(c / total * math.log(c / total) for c in pairs.values())
    unigram = -sum(c / total * math.log(c / total) for c in firsts.values())
    conditional = -sum(c / total * math.log(c / firsts[a]) for (a, _), c in pairs.items())
    return unigram, conditional, joint


def test_cyclic_chain_is_uniform_and_deterministic():
    vocab = 97
    chain = np.tile(np.arange(vocab), 21)[: 20 * vocab + 1]  # 0, 1, ..., 96, 0, 1, ... each first token 20 times
    e = estimate_entropies(sample_of([chain]))
    assert e.unigram_nats == pytest.approx(math.log(vocab), abs=1e-12)
    assert e.conditional_nats == pytest.approx(0.0, abs=1e-12)
    assert e.joint_nats == pytest.approx(math.log(vocab), abs=1e-12)
    assert (e.distinct_tokens, e.distinct_pairs, e.pairs) == (vocab, vocab, 20 * vocab)


def test_iid_uniform_tokens_approach_log_v():
    vocab, n = 8, 200_000
    tokens = np.random.default_rng(0).integers(0, vocab, n)
    e = estimate_entropies(sample_of([tokens]))
    # Plug-in bias is about (outcomes - 1) / (2n): 2e-5 for tokens, 2e-4 for pairs.
    assert e.unigram_nats == pytest.approx(math.log(vocab), abs=2e-3)
    assert e.conditional_nats == pytest.approx(math.log(vocab), abs=2e-3)
    assert e.joint_nats == pytest.approx(2 * math.log(vocab), abs=2e-3)


def test_pairs_never_cross_document_boundaries():
    documents = [[0, 1] * 50, [5, 6] * 50]  # each a deterministic chain; 1 -> 5 only across the boundary
    assert estimate_entropies(sample_of(documents)).conditional_nats == pytest.approx(0.0, abs=1e-12)
    joined = estimate_entropies(sample_of([np.concatenate(documents)]))
    assert joined.conditional_nats > 0.0
    assert estimate_entropies(sample_of(documents)).pairs == 198


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=30), min_size=1, max_size=8).filter(
    lambda docs: any(len(d) >= 2 for d in docs)))
def test_matches_reference_and_chain_rule_holds(documents):
    e = estimate_entropies(sample_of(documents))
    unigram, conditional, joint = reference_entropies(documents)
    assert e.unigram_nats == pytest.approx(unigram, abs=1e-9)
    assert e.conditional_nats == pytest.approx(conditional, abs=1e-9)
    assert e.joint_nats == pytest.approx(joint, abs=1e-9)
    assert e.joint_nats == pytest.approx(e.unigram_nats + e.conditional_nats, abs=1e-9)


def test_large_vocabulary_without_a_dense_table():
    # Ids up to 128k force the int64 pair keys (a V x V table would be 16G cells).
    rng = np.random.default_rng(1)
    documents = [rng.integers(0, 128_000, int(rng.integers(2, 300))) for _ in range(50)]
    e = estimate_entropies(sample_of(documents))
    assert (e.unigram_nats, e.conditional_nats, e.joint_nats) == pytest.approx(reference_entropies(documents), abs=1e-9)


def test_no_pairs_is_an_error():
    with pytest.raises(ValueError, match="no document of two or more tokens"):
        estimate_entropies(sample_of([[3], [4], [5]]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 random documents of 0-40 tokens (some empty) over 50 ids."""
    prefix = tmp_path_factory.mktemp("entropy") / "domain"
    return IndexedDataset(write_dataset(prefix, random_documents(seed=3, num_documents=60, max_length=40, vocab_size=50)))


def test_sample_is_deterministic_whole_documents_up_to_the_budget(dataset):
    a, b = token_sample(dataset, 500, seed=7), token_sample(dataset, 500, seed=7)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.document_starts, b.document_starts)
    assert a.tokens.size == 500
    assert not np.array_equal(a.tokens, token_sample(dataset, 500, seed=8).tokens)
    # Every sampled document but the last is a whole document of the dataset.
    documents = {tuple(dataset.document(d).tolist()) for d in range(dataset.num_documents)}
    ends = np.append(a.document_starts[1:], a.tokens.size)
    pieces = [tuple(a.tokens[s:e].tolist()) for s, e in zip(a.document_starts, ends)]
    assert all(p in documents for p in pieces[:-1])
    assert any(d[: len(pieces[-1])] == pieces[-1] for d in documents)


def test_budget_beyond_the_dataset_takes_every_nonempty_document(dataset):
    sample = token_sample(dataset, 10**9, seed=0)
    assert sample.tokens.size == dataset.num_tokens
    assert sample.num_documents == sum(1 for d in range(dataset.num_documents) if dataset.document(d).size)
    assert dataset_entropies(dataset, 10**9).tokens == dataset.num_tokens


def test_documents_of_several_sequences_count_pairs_across_their_sequences(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "split", np.uint16) as builder:
        builder.add_document([0, 1, 0, 1], lengths=[2, 2])  # one document stored as two sequences
    e = dataset_entropies(IndexedDataset(tmp_path / "split"), 100)
    assert e.pairs == 3 and e.conditional_nats == pytest.approx(0.0, abs=1e-12)


def test_mixture_from_entropies():
    assert mixture_from_entropies([1.0, 3.0]) == pytest.approx([0.25, 0.75])
    softmax = mixture_from_entropies([1.0, 1.0 + math.log(3.0)], mapping="softmax")
    assert softmax == pytest.approx([0.25, 0.75])
    assert mixture_from_entropies([1.0, 2.0], mapping="softmax", temperature=1e6) == pytest.approx([0.5, 0.5], abs=1e-6)
    for bad in ([0.0, 0.0], [-1.0, 2.0], [math.nan, 1.0], []):
        with pytest.raises(ValueError):
            mixture_from_entropies(bad)
    with pytest.raises(ValueError, match="unknown mapping"):
        mixture_from_entropies([1.0], mapping="rank")
