"""Pre-training sampler: exact resumption, data-parallel coverage, tails, and the DataLoader."""

import itertools

import numpy as np
import pytest
import torch

from megagrow.data.sampler import PretrainingSampler, build_pretraining_data_loader
from megagrow.errors import UserError

CONFIGS = [  # (total_samples, micro_batch_size, data_parallel_size, micro_batches_per_step)
    (100, 1, 1, 1),
    (101, 2, 3, 2),
    (257, 4, 2, 3),
    (64, 8, 8, 1),
]


def _sampler(total, consumed, mbs, rank, dp, drop_last=True):
    return PretrainingSampler(total, consumed, mbs, rank, dp, drop_last=drop_last)


@pytest.mark.parametrize("total, mbs, dp, accumulation", CONFIGS)
def test_resuming_at_consumed_samples_continues_exactly(total, mbs, dp, accumulation):
    global_batch = mbs * dp * accumulation
    for rank in range(dp):
        from_start = list(_sampler(total, 0, mbs, rank, dp))
        for steps in range(1, total // global_batch):
            resumed = list(_sampler(total, steps * global_batch, mbs, rank, dp))
            assert resumed == from_start[steps * accumulation :]


@pytest.mark.parametrize("total, mbs, dp, accumulation", CONFIGS)
def test_ranks_of_each_step_cover_consecutive_samples(total, mbs, dp, accumulation):
    per_rank = [list(_sampler(total, 0, mbs, rank, dp)) for rank in range(dp)]
    assert len({len(batches) for batches in per_rank}) == 1
    for step, batches in enumerate(zip(*per_rank)):
        assert all(len(batch) == mbs for batch in batches)
        assert list(itertools.chain(*batches)) == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    assert len(_sampler(total, 0, mbs, 0, dp)) == len(per_rank[0]) == total // (mbs * dp)


def test_last_partial_step_is_split_in_rank_order_unless_dropped():
    # 10 samples, 2 per rank, 3 ranks: one full step (0..5), then 6..9 for ranks 0 and 1.
    tails = [list(_sampler(10, 0, 2, rank, 3, drop_last=False))[1:] for rank in range(3)]
    assert tails == [[[6, 7]], [[8, 9]], []]
    assert [len(_sampler(10, 0, 2, rank, 3, drop_last=False)) for rank in range(3)] == [2, 2, 1]
    assert list(_sampler(11, 0, 2, 2, 3, drop_last=False))[-1] == [10]
    assert len(list(_sampler(10, 0, 2, 0, 3))) == 1


def test_bad_arguments():
    with pytest.raises(UserError, match="consumed_samples 10 leaves none"):
        _sampler(10, 10, 1, 0, 1)
    with pytest.raises(UserError, match="no samples"):
        _sampler(0, 0, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2 outside"):
        _sampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="must be positive"):
        _sampler(10, 0, 0, 0, 1)


class _Numbers(torch.utils.data.Dataset):
    """Sample i is {"tokens": [i, i, i]}."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"tokens": torch.full((3,), i, dtype=torch.int64)}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_loader_yields_this_ranks_micro_batches_from_consumed_samples(num_workers):
    loader = build_pretraining_data_loader(
        _Numbers(), consumed_samples=12, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=3,
        num_workers=num_workers, pin_memory=True,
    )
    firsts = [batch["tokens"][:, 0].tolist() for batch in loader]
    assert firsts == [[14, 15], [20, 21], [26, 27], [32, 33]]
    assert all(batch["tokens"].shape == (2, 3) for batch in loader)
    np.testing.assert_array_equal(np.concatenate(firsts) % 6 // 2, 1)  # always rank 1's slot
