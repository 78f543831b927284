"""GPT pre-training samples: fixed-length windows over a shuffled, multi-epoch document stream.

megatron-core 0.16's algorithm, sample for sample:

- `--split 969,30,1` cuts the dataset's documents (each sequence of the indexed
  dataset is one document) into contiguous train/valid/test ranges at the rounded
  cumulative shares, round((w_0 + ... + w_i) * num_documents).
- `doc_idx` lists a split's documents once per epoch, shuffled. When the last of
  several epochs is needed for less than 80% of its samples it is shuffled on its
  own ("separate final epoch"); otherwise the few samples taken from it would come
  from documents placed early by a shuffle over all epochs, i.e. not uniformly.
- `sample_idx[i]` = (position in doc_idx, token offset) where sample i starts and
  `sample_idx[i + 1]` where it ends: a sample has seq_length + 1 tokens, may span
  documents, and shares its last token with the next sample.
- `shuffle_idx` permutes the samples (with a separate final epoch, the earlier
  epochs' samples and the last epoch's are permuted separately, then concatenated).

Each item is `{"tokens": int64 tensor[seq_length + 1]}`; the training step uses
`tokens[:-1]` as input and `tokens[1:]` as labels. Indices are cached on disk by
`index_cache`, so only the first run (and only one rank) builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megagrow.data import index_cache
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.data.native import build_sample_idx
from megagrow.errors import UserError

logger = logging.getLogger("megagrow.data")

SPLIT_NAMES = ("train", "valid", "test")
INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")
# Below this fraction of an epoch's samples the last epoch is shuffled on its own.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclasses.dataclass
class GPTDatasetConfig:
    """What defines the GPT samples of a dataset, apart from the data and the sample counts."""

    seq_length: int
    seed: int = 1234
    # Relative shares of the documents for train, valid and test (Megatron's --split).
    split: str = "969,30,1"
    # Directory for cached indices; None puts them in `cache/` beside each dataset.
    cache_path: str | None = None
    # The model's vocabulary: a sample holding an id outside [0, vocab_size) stops the run as it
    # is read (cheap: one max per sample), instead of an index error deep in the embedding.
    vocab_size: int | None = None

    def __post_init__(self):
        if self.seq_length <= 0:
            raise UserError(f"--seq-length {self.seq_length}: must be a positive number of tokens")
        parse_split(self.split)  # fail at configuration time, not after loading data

    def cache_dir(self, prefix: str | os.PathLike) -> Path:
        """Where the indices of the dataset `prefix` are cached."""
        if self.cache_path is not None:
            return Path(self.cache_path)
        return Path(os.path.abspath(prefix)).parent / "cache"


def parse_split(split: str) -> list[float]:
    """Normalised train/valid/test weights from a string like "969,30,1" (missing parts are 0)."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    remedy = 'give up to three non-negative numbers for train,valid,test, e.g. --split 969,30,1'
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--split {split!r}: not a list of numbers; {remedy}") from None
    if len(weights) > len(SPLIT_NAMES):
        raise UserError(f"--split {split!r}: {len(weights)} parts; {remedy}")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--split {split!r}: weights must be non-negative with a positive sum; {remedy}")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    return normalise(weights)


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights divided by their float64 numpy sum, as megatron-core normalises splits and blends (same bits)."""
    # From 8 values on numpy sums pairwise, unlike Python's sum (compensated from 3.12 on),
    # and a last-bit difference can move a split bound or a blend's tie-break.
    array = np.asarray(weights, dtype=np.float64)
    return (array / np.sum(array)).tolist()


def split_document_ranges(weights: Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) document ranges for normalised split weights, cut where megatron-core cuts."""
    # megatron-core rounds the cumulative shares, summed left to right in float64, with
    # Python's round (half to even): 3 documents split 1,1 are [0, 2) and [2, 3), 5 are
    # [0, 2) and [2, 5). (Megatron-LM before megatron-core rounded each share and moved
    # the error into the first split, which cuts elsewhere for a quarter (969,30,1) to
    # half (98,1,1) of all sizes.)
    bounds, cumulative = [0], 0.0
    for weight in weights:
        cumulative += weight
        bounds.append(int(round(cumulative * float(num_documents))))
    return list(zip(bounds[:-1], bounds[1:]))


def plan_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> tuple[int, bool]:
    """(epochs needed for num_samples samples, whether the last epoch is shuffled separately)."""
    if num_samples == 0:
        return 1, False
    # Smallest e with (e * tokens_per_epoch - 1) // seq_length >= num_samples: the
    # stream must hold num_samples * seq_length tokens plus the final label token.
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    if num_epochs == 1:
        return 1, False
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - samples_before_last
    return num_epochs, last_epoch_samples < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)


def build_gpt_indices(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """doc_idx, sample_idx and shuffle_idx for `num_samples` samples over `documents` (ids into sizes)."""
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs, separate_final_epoch = plan_epochs(tokens_per_epoch, seq_length, num_samples)
    logger.debug(
        "%d samples of %d tokens need %d epoch(s) of %d documents (%d tokens)%s",
        num_samples, seq_length, num_epochs, len(documents), tokens_per_epoch,
        ", the last shuffled separately" if separate_final_epoch else "",
    )
    # One generator for both shuffles, drawn in this order. The cache key holds only the
    # seed, so a change to the order must come with a new index_cache.FORMAT_VERSION.
    rng = np.random.RandomState(seed)
    doc_dtype = np.int32 if len(sizes) < np.iinfo(np.int32).max else np.int64
    documents = documents.astype(doc_dtype, copy=False)
    if separate_final_epoch:
        doc_idx = np.concatenate(
            [_shuffled_epochs(documents, num_epochs - 1, rng), _shuffled_epochs(documents, 1, rng)]
        )
    else:
        doc_idx = _shuffled_epochs(documents, num_epochs, rng)
    # Every complete sample the epochs hold, not just num_samples: a blend may read a few more.
    num_built = max(0, (num_epochs * tokens_per_epoch - 1) // seq_length)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_built)
    num_first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate_final_epoch else num_built
    shuffle_idx = _shuffled_samples(num_first, num_built, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def _shuffled_epochs(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    doc_idx = np.tile(documents, num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def _shuffled_samples(num_first: int, num_total: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples [0, num_first) permuted, followed by [num_first, num_total) permuted on their own."""
    dtype = np.uint32 if num_total < np.iinfo(np.uint32).max else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    last = np.arange(num_first, num_total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


class GPTDataset(index_cache.PicklesByCacheLocation, torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens from one split of an indexed dataset."""

    index_names = INDEX_NAMES

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        document_range: tuple[int, int],
        num_samples: int | None,
        config: GPTDatasetConfig,
    ):
        self.indexed = indexed
        self.split_name = split_name
        self.config = config
        start, stop = document_range
        sizes = indexed.sizes
        tokens_per_epoch = int(sizes[start:stop].sum(dtype=np.int64))
        if num_samples is None:  # one epoch
            num_samples = max(0, (tokens_per_epoch - 1) // config.seq_length)
        num_samples = int(num_samples)
        if num_samples > 0 and tokens_per_epoch == 0:
            holds = "no documents" if start == stop else f"only empty documents [{start}, {stop})"
            raise UserError(
                f"{indexed.prefix}: the {split_name} split of --split {config.split} holds {holds} but "
                f"{num_samples} {split_name} samples were requested; give {split_name} a larger share "
                f"of --split or request no {split_name} samples"
            )
        self.num_samples = num_samples
        description = {
            "prefix": os.path.abspath(indexed.prefix),
            "num_sequences": len(indexed),
            # The indices depend on the data only through these sizes.
            "sizes_sha256": hashlib.sha256(np.ascontiguousarray(sizes[start:stop])).hexdigest(),
            "split": split_name,
            "document_range": [start, stop],
            "seq_length": config.seq_length,
            "num_samples": num_samples,
            "seed": config.seed,
            "separate_final_epoch": plan_epochs(tokens_per_epoch, config.seq_length, num_samples)[1],
        }
        self.cache_key = index_cache.cache_key("gpt", description)
        self.cache_dir = config.cache_dir(indexed.prefix)
        indices = index_cache.load_or_build(
            self.cache_dir,
            "gpt",
            description,
            INDEX_NAMES,
            lambda: build_gpt_indices(
                sizes, np.arange(start, stop), config.seq_length, num_samples, config.seed
            ),
            label=f"the {split_name} split of {indexed.prefix} ({num_samples} samples)",
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (indices[name] for name in INDEX_NAMES)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} outside {self.split_name} dataset of {len(self)} samples")
        tokens = self.tokens(int(self.shuffle_idx[idx]))
        vocab_size = self.config.vocab_size
        if vocab_size is not None and tokens.size and (tokens.max() >= vocab_size or tokens.min() < 0):
            bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
            raise UserError(f"{self.indexed.prefix}: token id {bad} (in {self.split_name} sample {idx}) is outside "
                            f"the model's vocabulary of {vocab_size}; the data was tokenized with another tokenizer: "
                            f"pass that one with --tokenizer-model (or a --vocab-size above {bad})")
        return {"tokens": torch.from_numpy(tokens)}

    def tokens(self, sample: int) -> np.ndarray:
        """Tokens of unshuffled sample `sample` (seq_length + 1 of them, possibly spanning documents)."""
        first_pos, first_offset = (int(v) for v in self.sample_idx[sample])
        last_pos, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        doc = self.doc_idx
        if first_pos == last_pos:
            pieces = [self.indexed.get(int(doc[first_pos]), first_offset, last_offset - first_offset + 1)]
        else:
            pieces = [self.indexed.get(int(doc[first_pos]), first_offset)]
            pieces += [self.indexed.get(int(doc[pos])) for pos in range(first_pos + 1, last_pos)]
            pieces.append(self.indexed.get(int(doc[last_pos]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)


def build_gpt_datasets(
    prefix: str | os.PathLike, config: GPTDatasetConfig, num_samples: Sequence[int | None]
) -> list[GPTDataset | None]:
    """Train, valid and test datasets of `prefix` with the requested sample counts (None: one epoch).

    A split is None where 0 samples are requested, or None and it has no documents.
    """
    if len(num_samples) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples needs one entry per split {SPLIT_NAMES}, got {list(num_samples)}")
    indexed = IndexedDataset(prefix)
    ranges = split_document_ranges(parse_split(config.split), len(indexed))
    datasets = []
    for name, (start, stop), count in zip(SPLIT_NAMES, ranges, num_samples):
        if count == 0 or (count is None and start == stop):
            datasets.append(None)
        else:
            datasets.append(GPTDataset(indexed, name, (start, stop), count, config))
    return datasets
