"""Index cache across gloo ranks: rank 0 builds and the rest load; nodes without a shared cache build their own."""

import logging
import os

import numpy as np
import torch.distributed as dist

from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed
from megagrow.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megagrow.errors import UserError


class _Outcomes(logging.Handler):
    """Remembers whether each index cache log line of megagrow.data says "built" or "loaded"."""

    def __init__(self):
        super().__init__()
        self.words = []

    def emit(self, record):
        word = record.getMessage().split()[0]
        if word in ("built", "loaded"):
            self.words.append(word)


def _build_train_split(prefix, cache_dirs, local_ranks):
    """On each rank: build the train split with this rank's cache dir and LOCAL_RANK; report what happened."""
    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    outcomes = _Outcomes()
    logger = logging.getLogger("megagrow.data")
    logger.addHandler(outcomes)
    logger.setLevel(logging.DEBUG)  # the per-entry lines are DEBUG; one INFO line per job
    config = GPTDatasetConfig(seq_length=8, seed=3, split="1", cache_path=cache_dirs[rank])
    try:
        train = build_gpt_datasets(prefix, config, [200, None, None])[0]
    except UserError as err:  # returned, not raised, so the test sees every rank's error
        return {"outcomes": outcomes.words, "error": str(err)}
    return {"outcomes": outcomes.words, "sample_idx": np.array(train.sample_idx),
            "shuffle_idx": np.array(train.shuffle_idx)}


def _run(tmp_path, cache_dirs, local_ranks):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=0, num_documents=50, max_length=40))
    return run_distributed(_build_train_split, len(cache_dirs), prefix, [str(d) for d in cache_dirs], local_ranks)


def _assert_identical_indices(results):
    for name in ("sample_idx", "shuffle_idx"):
        assert all(np.array_equal(results[0][name], r[name]) for r in results[1:])


def test_rank0_builds_and_the_others_load(tmp_path):
    cache = tmp_path / "shared_cache"
    results = _run(tmp_path, [cache] * 3, local_ranks=[0, 1, 2])
    assert [r["outcomes"] for r in results] == [["built"], ["loaded"], ["loaded"]]
    _assert_identical_indices(results)
    assert not [p for p in os.listdir(cache) if p.startswith(".")]  # no temporaries left behind


def test_nodes_without_a_shared_cache_each_build_the_same_bytes(tmp_path):
    caches = [tmp_path / "node0" / "cache", tmp_path / "node1" / "cache"]
    results = _run(tmp_path, caches, local_ranks=[0, 0])
    assert [r["outcomes"] for r in results] == [["built"], ["built"]]
    _assert_identical_indices(results)
    arrays = sorted(name for name in os.listdir(caches[0]) if name.endswith(".npy"))
    assert len(arrays) == 3 and arrays == sorted(n for n in os.listdir(caches[1]) if n.endswith(".npy"))
    assert all((caches[0] / name).read_bytes() == (caches[1] / name).read_bytes() for name in arrays)


def test_a_failed_build_fails_every_rank_instead_of_hanging(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    results = _run(tmp_path, [blocker / "cache", tmp_path / "cache1"], local_ranks=[0, 1])
    assert "cannot write dataset index cache" in results[0]["error"]
    assert "failed on another rank" in results[1]["error"]
