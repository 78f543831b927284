"""Pure-numpy references for the C++ index builders in `csrc/helpers.cpp`.

They define what the C++ code must compute (the tests compare the two on random
inputs) and are the baseline the benchmark measures the C++ speed-up against.
Training never uses them.
"""

from __future__ import annotations

import numpy as np


def _index_dtype(doc_idx: np.ndarray) -> type:
    """The C++ builder stores int32 whenever doc_idx positions fit, int64 otherwise."""
    return np.int32 if len(doc_idx) < np.iinfo(np.int32).max else np.int64


def _too_few_tokens(num_samples: int, seq_length: int) -> ValueError:
    return ValueError(
        f"build_sample_idx: documents hold too few tokens for {num_samples} samples of {seq_length} tokens"
    )


def _check_arguments(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> None:
    """The C++ argument checks, except that every doc_idx entry is checked, not only those reached."""
    if seq_length <= 0:
        raise ValueError("build_sample_idx: seq_length must be > 0")
    if num_samples < 0:
        raise ValueError("build_sample_idx: num_samples must be >= 0")
    if len(doc_idx) and (doc_idx.min() < 0 or doc_idx.max() >= len(sizes)):
        bad = doc_idx[(doc_idx < 0) | (doc_idx >= len(sizes))][0]
        raise ValueError(f"build_sample_idx: doc_idx entry {bad} is outside sizes (length {len(sizes)})")


def build_sample_idx_loop(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """build_sample_idx written as the obvious walk over documents, one sample at a time."""
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx)
    _check_arguments(sizes, doc_idx, seq_length, num_samples)
    # Python ints: per-element numpy scalar arithmetic would be several times slower.
    sizes_list, doc_list = sizes.tolist(), doc_idx.tolist()
    sample_idx = np.zeros((num_samples + 1, 2), dtype=_index_dtype(doc_idx))
    doc_pos, doc_offset = 0, 0
    for sample in range(1, num_samples + 1):
        # A sample has seq_length + 1 tokens and ends on the token the next one starts
        # with, so each sample advances the stream by exactly seq_length tokens.
        remaining = seq_length + 1
        while True:
            if doc_pos >= len(doc_list):
                raise _too_few_tokens(num_samples, seq_length)
            doc_left = sizes_list[doc_list[doc_pos]] - doc_offset
            if remaining <= doc_left:
                doc_offset += remaining - 1
                break
            remaining -= doc_left
            doc_pos += 1
            doc_offset = 0
        sample_idx[sample] = doc_pos, doc_offset
    return sample_idx


def build_sample_idx_vectorized(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """build_sample_idx by cumsum + searchsorted: sample i starts at stream token i * seq_length."""
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx)
    _check_arguments(sizes, doc_idx, seq_length, num_samples)
    doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    boundaries = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and (len(doc_ends) == 0 or doc_ends[-1] <= boundaries[-1]):
        raise _too_few_tokens(num_samples, seq_length)
    # side="right" picks the document that holds the boundary token and skips empty
    # documents before it, exactly where the sequential walk stops.
    positions = np.searchsorted(doc_ends, boundaries, side="right")
    doc_starts = doc_ends - sizes[doc_idx]
    sample_idx = np.zeros((num_samples + 1, 2), dtype=_index_dtype(doc_idx))
    # Row 0 is (0, 0) even when the first documents are empty: the walk starts there.
    sample_idx[1:, 0] = positions
    sample_idx[1:, 1] = boundaries - doc_starts[positions]
    return sample_idx


def _check_blend_arguments(weights: np.ndarray, size: int) -> None:
    if len(weights) == 0:
        raise ValueError("build_blending_indices: no weights given")
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    if not np.all(weights >= 0):
        raise ValueError("build_blending_indices: weights must be >= 0")


def build_blending_indices_loop(weights, size: int, rule: str = "megatron") -> tuple[np.ndarray, np.ndarray]:
    """The blending order of `rule` ("megatron" or "tijdeman"), one sample at a time (see csrc/helpers.cpp)."""
    weights = np.asarray(weights, dtype=np.float64)
    _check_blend_arguments(weights, size)
    if rule == "megatron":
        return _blend_megatron_loop(weights, size)
    if rule == "tijdeman":
        return _blend_tijdeman_loop(weights, size)
    raise ValueError(f"build_blending_indices: rule must be 'megatron' or 'tijdeman', got {rule!r}")


def _blend_megatron_loop(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest lag w_d * max(k, 1) - count_d among positive weights, ties to the lowest index."""
    positive = weights > 0
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for step in range(size):
        # float64 product, then difference, as in the C++; argmax takes the first maximum.
        lag = np.where(positive, weights * float(max(step, 1)) - counts, -np.inf)
        best = int(np.argmax(lag))
        dataset_index[step] = best
        dataset_sample_index[step] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def _blend_tijdeman_loop(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Among datasets lagging by at least c = 1/(2k-2), the one whose next sample is due soonest."""
    positive = weights > 0
    k = int(positive.sum())
    c = 1.0 / (2 * k - 2) if k > 1 else 0.0
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    safe_weights = np.where(positive, weights, 1.0)
    for step in range(size):
        # Same float64 operations in the same order as the C++, so ties break identically.
        lag = np.where(positive, weights * float(step + 1) - counts, -np.inf)
        candidates = np.flatnonzero(positive & (lag >= c))
        if len(candidates):
            with np.errstate(over="ignore"):  # tiny weights: due dates overflow to inf, as in C++
                due = (1.0 - c + counts[candidates]) / safe_weights[candidates]
            best = int(candidates[np.argmin(due)])
        else:
            best = int(np.argmax(lag))
        dataset_index[step] = best
        dataset_sample_index[step] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index
