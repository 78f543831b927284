"""Small random Megatron datasets for the data tests (imported by the test modules)."""

from __future__ import annotations

import numpy as np

from megagrow.data.indexed_dataset import IndexedDatasetBuilder


def random_documents(seed: int, num_documents: int, max_length: int, vocab_size: int = 1000) -> list[np.ndarray]:
    """Documents of 0..max_length random tokens (empty ones included, as real data has them)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, rng.integers(0, max_length + 1)) for _ in range(num_documents)]


def write_dataset(prefix, documents) -> str:
    """Write `documents` as a uint16 `.bin/.idx` pair, one sequence per document; returns the prefix."""
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for tokens in documents:
            builder.add_document(tokens)
    return str(prefix)


def patterned_documents(seed: int, num_documents: int, max_length: int, vocab_size: int = 1000) -> list[np.ndarray]:
    """Learnable documents: arithmetic progressions (mod vocab) with a random start and a step of 1-3.

    Uniform random tokens cannot be learned (the loss starts at log V and stays there), so
    tests that check a loss goes down train on these instead.
    """
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(num_documents):
        length = int(rng.integers(max_length // 2, max_length + 1))
        start, step = int(rng.integers(0, vocab_size)), int(rng.integers(1, 4))
        documents.append((start + step * np.arange(length)) % vocab_size)
    return documents
