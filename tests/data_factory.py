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
