"""Resumable pre-training batch sampler and the DataLoader built on it.

Samples are consumed in order, one global batch of micro_batch_size *
data_parallel_size consecutive indices per step; data-parallel rank r takes the
r-th micro-batch of it. The order depends only on `consumed_samples`, so a run
resumed from a checkpoint that recorded it continues with exactly the samples an
uninterrupted run would have seen. (The datasets are already shuffled by their
own indices, so reading them in order is random enough.)
"""

from __future__ import annotations

from typing import Iterator

import torch

from megagrow.errors import UserError


class PretrainingSampler:
    """Yields this data-parallel rank's micro-batches of sample indices, starting at consumed_samples."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        if total_samples <= 0:
            raise UserError(f"the dataset has no samples ({total_samples}); check --data-path and --split")
        if not 0 <= consumed_samples < total_samples:
            raise UserError(
                f"consumed_samples {consumed_samples} leaves none of the dataset's {total_samples} samples; "
                f"the checkpoint has finished this data: raise --train-iters/--train-samples to train further"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    @property
    def global_micro_batch_size(self) -> int:
        """Samples consumed by one micro-batch step over all data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full_steps, tail = divmod(remaining, self.global_micro_batch_size)
        has_tail_batch = not self.drop_last and len(self._tail_slice(tail)) > 0
        return full_steps + int(has_tail_batch)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch_size
        own_offset = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + step <= self.total_samples:
            yield list(range(start + own_offset, start + own_offset + self.micro_batch_size))
            start += step
        if not self.drop_last:
            # The last, partial step is cut into micro-batches in rank order, so the
            # later ranks may get a short batch or none at all.
            tail = self._tail_slice(self.total_samples - start)
            if len(tail):
                yield [start + i for i in tail]

    def _tail_slice(self, tail: int) -> range:
        """Positions of this rank's samples within a last step of `tail` samples."""
        own_offset = self.data_parallel_rank * self.micro_batch_size
        return range(min(own_offset, tail), min(own_offset + self.micro_batch_size, tail))


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 2,
    pin_memory: bool = True,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's micro-batches of `dataset` from consumed_samples on, in order."""
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        # Pinned pages only help host-to-GPU copies.
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
