"""--dataloader-type cyclic: Megatron's random sampler, epoch after epoch, resumable, data-parallel disjoint.

The equality with Megatron-LM's own MegatronPretrainingRandomSampler runs where a Megatron-LM
git checkout is named by MEGATRON_LM_REPO (its core_v0.16.1 tag is read with git show);
megatron-core 0.16.1 must be installed for the module's imports.
"""

import itertools
import os
import subprocess
import sys
import types

import pytest
import torch

from megagrow.data.sampler import CyclicPretrainingSampler, build_pretraining_data_loader

CONFIGS = [  # (total_samples, micro_batch_size, data_parallel_size)
    (40, 2, 2),
    (37, 2, 3),
    (101, 4, 2),
    (14, 2, 4),  # the unsharded deal gives rank 0 an extra micro-batch at the epoch's end
    (9, 1, 1),
]


def _batches(total, consumed, mbs, rank, dp, sharding, count):
    return list(itertools.islice(CyclicPretrainingSampler(total, consumed, mbs, rank, dp, sharding), count))


@pytest.mark.parametrize("sharding", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("total, mbs, dp", CONFIGS)
def test_each_epoch_is_a_fresh_permutation_dealt_disjointly(total, mbs, dp, sharding):
    step = mbs * dp
    epoch_samples = total - total % step
    steps_per_epoch = epoch_samples // step
    per_rank = [_batches(total, 0, mbs, rank, dp, sharding, 3 * steps_per_epoch) for rank in range(dp)]
    epochs = []
    for epoch in range(3):
        taken = [i for batches in per_rank for batch in batches[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
                 for i in batch]
        assert len(taken) == len(set(taken)) == epoch_samples  # no sample twice within an epoch
        assert all(0 <= i < total for i in taken)
        if sharding:  # rank r walks its own contiguous bucket
            bucket = epoch_samples // dp
            for rank, batches in enumerate(per_rank):
                mine = {i for batch in batches[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch] for i in batch}
                assert mine == set(range(rank * bucket, (rank + 1) * bucket))
        epochs.append(taken)
    if epoch_samples > 2:
        assert epochs[0] != epochs[1]  # reshuffled every epoch


@pytest.mark.parametrize("sharding", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("total, mbs, dp", CONFIGS)
def test_resuming_at_consumed_samples_continues_exactly(total, mbs, dp, sharding):
    step = mbs * dp
    for rank in range(dp):
        straight = _batches(total, 0, mbs, rank, dp, sharding, 40)
        for steps in (1, 3, total // step, total // step + 2):
            assert _batches(total, steps * step, mbs, rank, dp, sharding, 40 - steps) == straight[steps:]


def test_the_data_loader_reads_the_cyclic_order_and_keeps_going():
    dataset = torch.arange(10).view(10, 1)
    loader = build_pretraining_data_loader(dataset, 0, 2, 0, 1, num_workers=0, dataloader_type="cyclic")
    batches = [batch.view(-1).tolist() for batch in itertools.islice(loader, 12)]  # 2.4 epochs
    assert sorted(i for batch in batches[:5] for i in batch) == list(range(10))
    assert sorted(i for batch in batches[5:10] for i in batch) == list(range(10))
    assert batches[:5] != batches[5:10]


def _megatron_random_sampler():
    """Megatron-LM 0.16.1's MegatronPretrainingRandomSampler, loaded from the checkout in MEGATRON_LM_REPO."""
    repo = os.environ.get("MEGATRON_LM_REPO")
    if not repo:
        pytest.skip("MEGATRON_LM_REPO (a Megatron-LM git checkout) is not set")
    pytest.importorskip("megatron.core")
    source = subprocess.run(["git", "-C", repo, "show", "core_v0.16.1:megatron/training/datasets/data_samplers.py"],
                            capture_output=True, text=True, check=True).stdout
    # megatron.training is not part of the megatron-core wheel: the sampler only needs names from it.
    training = types.ModuleType("megatron.training")
    training.get_args = lambda: None
    handler = types.ModuleType("megatron.training.dist_signal_handler")
    handler.DistributedSignalHandler = object
    saved = {name: sys.modules.get(name) for name in (training.__name__, handler.__name__)}
    sys.modules.update({training.__name__: training, handler.__name__: handler})
    try:
        namespace: dict = {}
        exec(compile(source, "data_samplers.py", "exec"), namespace)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    return namespace["MegatronPretrainingRandomSampler"]


def _megatron_batches(sampler_class, total, consumed, mbs, rank, dp, sharding, count):
    sampler = sampler_class(None, total_samples=total, consumed_samples=consumed, micro_batch_size=mbs,
                            data_parallel_rank=rank, data_parallel_size=dp, data_sharding=sharding)

    def cyclic():  # Megatron's cyclic_iter: iterate the sampler again when an epoch ends
        while True:
            yield from sampler

    return list(itertools.islice(cyclic(), count))


@pytest.mark.parametrize("sharding", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("total, mbs, dp", [c for c in CONFIGS if c != (14, 2, 4)])
def test_same_samples_as_megatron_lm(total, mbs, dp, sharding):
    megatron = _megatron_random_sampler()
    step = mbs * dp
    for rank in range(dp):
        for consumed in (0, step, 2 * (total // step) * step):
            ours = _batches(total, consumed, mbs, rank, dp, sharding, 30)
            assert ours == _megatron_batches(megatron, total, consumed, mbs, rank, dp, sharding, 30)
