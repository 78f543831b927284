"""Datasets and per-rank micro-batch iterators for training and validation.

Every rank of a tensor-parallel group reads the same micro-batches (the sampler only
depends on the data-parallel coordinates), so no broadcast of batches is needed; only the
first and last pipeline stages read data at all (tokens in, labels out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megagrow.data.blended_dataset import BlendComponent, build_blended_datasets, domain_names, parse_data_path
from megagrow.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megagrow.data.sampler import build_pretraining_data_loader
from megagrow.config import DataConfig
from megagrow.errors import UserError

logger = logging.getLogger("megagrow.training")


class MockGPTDataset(torch.utils.data.Dataset):
    """Uniformly random tokens, a pure function of (seed, index): for smoke tests and benchmarks."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng([self.seed, idx])
        return {"tokens": torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64))}


@dataclass
class SampleCounts:
    """Samples each split must provide for a run."""

    train: int
    valid: int
    test: int


def sample_counts(train_iters: int, global_batch_size: int, eval_iters: int, evaluates: bool) -> SampleCounts:
    """Train samples for every iteration; valid and test samples for --eval-iters global batches.

    Every evaluation reads the same first batches of the valid split, so successive
    validation losses differ only by the model (the BiMix fit relies on that).
    """
    eval_samples = eval_iters * global_batch_size if evaluates else 0
    return SampleCounts(train_iters * global_batch_size, eval_samples, eval_samples)


@dataclass
class RunDatasets:
    """What a run reads: the training blend, the validation blend, and each domain's own validation split."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    domain_valid: dict[str, torch.utils.data.Dataset | None]


def build_datasets(data: DataConfig, seq_length: int, vocab_size: int, seed: int, counts: SampleCounts) -> RunDatasets:
    """Datasets for the run; per-domain validation sets only when the blend has several domains."""
    if data.mock_data:
        valid = MockGPTDataset(counts.valid, seq_length, vocab_size, seed + 1) if counts.valid else None
        return RunDatasets(MockGPTDataset(counts.train, seq_length, vocab_size, seed), valid, {})
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, split=data.split, cache_path=data.data_cache_path,
                              vocab_size=vocab_size)
    started = time.perf_counter()
    train, valid, _ = build_blended_datasets(data.data_path, config, [counts.train, counts.valid, None],
                                             blend_rule=data.blend_rule)
    components = parse_data_path(data.data_path)
    domain_valid = {}
    if len(components) > 1 and counts.valid:
        # BiMix needs each domain's loss on its own held-out data, not on its share of the blend.
        for name, component in zip(domain_names(components), components):
            domain_valid[name] = build_gpt_datasets(component.prefix, config, [0, counts.valid, 0])[1]
    # One line for all the index files (each one's is at DEBUG level, in megagrow.data).
    cache_dirs = sorted({str(config.cache_dir(c.prefix)) for c in components})
    where = cache_dirs[0] if len(cache_dirs) == 1 else f"{len(cache_dirs)} directories, {cache_dirs[0]} first"
    logger.info("sample indices of %d dataset(s) (%d train, %d valid samples) ready in %.1f s, cached in %s",
                len(components), counts.train, counts.valid, time.perf_counter() - started, where)
    return RunDatasets(train, valid, domain_valid)


def run_domains(data: DataConfig) -> tuple[list[str], list[BlendComponent]]:
    """Domain names and blend components of --data-path (known on every rank without reading data)."""
    if data.mock_data:
        return [], []
    components = parse_data_path(data.data_path)
    return (domain_names(components) if len(components) > 1 else []), components


def micro_batch_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                         num_workers: int, dataloader_type: str = "single", data_sharding: bool = True) -> Iterator[dict]:
    """Endless-as-needed iterator of this rank's micro-batches, resuming at consumed_samples (--dataloader-type order)."""
    loader = build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size,
                                           num_workers=num_workers, dataloader_type=dataloader_type,
                                           data_sharding=data_sharding)
    return _one_line_errors(iter(loader)) if num_workers else iter(loader)


def _one_line_errors(batches: Iterator[dict]) -> Iterator[dict]:
    # A DataLoader worker's exception comes back with the worker's whole traceback as its
    # message; a UserError (e.g. a token outside the vocabulary) keeps its one line.
    try:
        yield from batches
    except UserError as err:
        last = str(err).strip().splitlines()[-1]
        raise UserError(last.split("UserError: ", 1)[-1]) from None
