"""Resumable pre-training batch samplers and the DataLoader built on them.

Megatron's two --dataloader-type orders, both functions of `consumed_samples` only, so
a run resumed from a checkpoint that recorded it continues with exactly the samples an
uninterrupted run would have seen:

single  (PretrainingSampler) samples in order, one step of micro_batch_size *
        data_parallel_size consecutive indices at a time; data-parallel rank r takes
        the r-th micro-batch of it. The datasets are already shuffled by their own
        indices, so reading them in order is random enough. One pass.
cyclic  (CyclicPretrainingSampler) Megatron's random sampler, endless: epoch e is a
        permutation drawn by torch.randperm from a generator seeded with e. With data
        sharding (Megatron's default) rank r owns a contiguous bucket of the epoch's
        samples and walks a permutation of it; without, the ranks deal one permutation
        of the whole dataset between them. An epoch is the dataset minus its last
        partial step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from megagrow.errors import UserError


class _RankSampler:
    """What both orders start from: the dataset's size, where the run is, and this rank's place."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int):
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    @property
    def global_micro_batch_size(self) -> int:
        """Samples consumed by one micro-batch step over all data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel_size


class PretrainingSampler(_RankSampler):
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
        super().__init__(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if total_samples <= 0:
            raise UserError(f"the dataset has no samples ({total_samples}); check --data-path and --split")
        if not 0 <= consumed_samples < total_samples:
            raise UserError(
                f"consumed_samples {consumed_samples} leaves none of the dataset's {total_samples} samples; "
                f"the checkpoint has finished this data: raise --train-iters/--train-samples to train further"
            )
        self.drop_last = drop_last

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


class CyclicPretrainingSampler(_RankSampler):
    """Yields this rank's micro-batches of Megatron's cyclic (random) order, epoch after epoch, from consumed_samples on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, data_sharding: bool = True):
        super().__init__(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        step = self.global_micro_batch_size
        if total_samples < step:
            raise UserError(f"the dataset has {total_samples} samples, fewer than one step of micro-batch "
                            f"{micro_batch_size} x data-parallel size {data_parallel_size}; check --data-path and --split")
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(f"consumed_samples {consumed_samples} is not a whole number of {step}-sample steps")
        self.data_sharding = data_sharding

    @property
    def epoch_samples(self) -> int:
        """Samples consumed by one epoch over all ranks: the dataset without its last partial step."""
        return self.total_samples - self.total_samples % self.global_micro_batch_size

    def _epoch_indices(self, epoch: int, offset: int) -> list[int]:
        """This rank's sample indices of `epoch`, from `offset` samples (all ranks) into it."""
        generator = torch.Generator()
        generator.manual_seed(epoch)
        if self.data_sharding:
            bucket = self.epoch_samples // self.data_parallel_size
            first = self.data_parallel_rank * bucket
            order = torch.randperm(bucket, generator=generator)[offset // self.data_parallel_size:]
            return (order + first).tolist()
        whole = self.total_samples - self.total_samples % self.micro_batch_size
        order = torch.randperm(whole, generator=generator)[offset:]
        return order[self.data_parallel_rank::self.data_parallel_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch_size
        while True:
            epoch, offset = divmod(self.consumed_samples, self.epoch_samples)
            indices = self._epoch_indices(epoch, offset)
            # Every rank takes the epoch's remaining full steps, no more: the unsharded deal can
            # leave a rank one extra micro-batch, which Megatron would read and the others not.
            for start in range(0, (self.epoch_samples - offset) // step * self.micro_batch_size,
                               self.micro_batch_size):
                self.consumed_samples += step
                yield indices[start:start + self.micro_batch_size]


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 2,
    pin_memory: bool = True,
    drop_last: bool = True,
    dataloader_type: str = "single",
    data_sharding: bool = True,
) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's micro-batches of `dataset` from consumed_samples on (in order, or cyclic)."""
    if dataloader_type == "cyclic":
        sampler = CyclicPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                           data_parallel_size, data_sharding)
    else:
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
