"""GPT samples: C++ index vs references, samples vs the document stream, splits, epochs, cache."""

import logging
import pickle
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_factory import random_documents, write_dataset
from megagrow.data import index_cache
from megagrow.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_datasets,
    build_gpt_indices,
    parse_split,
    plan_epochs,
    split_document_ranges,
)
from megagrow.data.index_reference import build_sample_idx_loop, build_sample_idx_vectorized
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.data.native import build_sample_idx
from megagrow.errors import UserError

SAMPLE_INDEX_BUILDERS = [build_sample_idx, build_sample_idx_loop, build_sample_idx_vectorized]


@st.composite
def sample_index_inputs(draw):
    sizes = np.array(draw(st.lists(st.integers(0, 40), min_size=1, max_size=20)), dtype=np.int32)
    doc_dtype = draw(st.sampled_from([np.int32, np.int64]))
    doc_idx = np.array(draw(st.lists(st.integers(0, len(sizes) - 1), max_size=50)), dtype=doc_dtype)
    seq_length = draw(st.integers(1, 30))
    total_tokens = int(sizes[doc_idx].sum())
    max_samples = max(0, (total_tokens - 1) // seq_length)
    return sizes, doc_idx, seq_length, draw(st.integers(0, max_samples))


@settings(max_examples=300, deadline=None)
@given(sample_index_inputs())
def test_cpp_sample_index_equals_references(inputs):
    sizes, doc_idx, seq_length, num_samples = inputs
    expected = build_sample_idx_loop(sizes, doc_idx, seq_length, num_samples)
    for build in (build_sample_idx, build_sample_idx_vectorized):
        got = build(sizes, doc_idx, seq_length, num_samples)
        assert got.dtype == expected.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("build", SAMPLE_INDEX_BUILDERS)
@pytest.mark.parametrize("doc_dtype", [np.int32, np.int64])
def test_too_few_tokens_is_a_clear_value_error(build, doc_dtype):
    sizes = np.array([5, 7], dtype=np.int32)
    doc_idx = np.array([0, 1], dtype=doc_dtype)  # 12 tokens: 2 samples of 5 (+1), not 3
    assert len(build(sizes, doc_idx, 5, 2)) == 3
    with pytest.raises(ValueError, match="too few tokens for 3 samples of 5 tokens"):
        build(sizes, doc_idx, 5, 3)


@pytest.mark.parametrize("build", SAMPLE_INDEX_BUILDERS)
def test_doc_idx_outside_sizes_is_rejected(build):
    with pytest.raises(ValueError, match="outside sizes"):
        # The C++ checks the entries it reaches: the sample needs 7 tokens, document 0 has 5.
        build(np.array([5, 7], dtype=np.int32), np.array([0, 2], dtype=np.int32), 6, 1)


def _stream(indexed, doc_idx):
    return np.concatenate([indexed.get(int(d)) for d in doc_idx]).astype(np.int64)


def test_samples_are_windows_of_the_document_stream(tmp_path):
    documents = random_documents(seed=0, num_documents=40, max_length=12)  # short: samples span documents
    prefix = write_dataset(tmp_path / "ds", documents)
    config = GPTDatasetConfig(seq_length=16, seed=5, split="1")
    (train, _, _) = build_gpt_datasets(prefix, config, [200, None, None])  # several epochs
    seq = config.seq_length
    stream = _stream(train.indexed, train.doc_idx)
    for sample in range(len(train)):
        np.testing.assert_array_equal(train.tokens(sample), stream[sample * seq : sample * seq + seq + 1])
    for idx in (0, 17, len(train) - 1):
        item = train[idx]["tokens"]
        assert item.dtype == torch.int64 and item.shape == (seq + 1,)
        np.testing.assert_array_equal(item.numpy(), train.tokens(int(train.shuffle_idx[idx])))
    assert sorted(train.shuffle_idx.tolist()) == list(range(len(train)))
    with pytest.raises(IndexError):
        train[len(train)]


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("80/20") == pytest.approx([0.8, 0.2, 0.0])
    for bad in ("a,b", "1,1,1,1", "-1,2", "0,0", "nan"):
        with pytest.raises(UserError, match="--split"):
            parse_split(bad)


def test_split_ranges_cut_at_the_rounded_cumulative_shares():
    # megatron-core: round(1/3 * 10) = 3, round(2/3 * 10) = 7 (the old Megatron-LM rule
    # rounded each share to 3 and gave the missing document to train: 4, 3, 3).
    assert split_document_ranges([1 / 3, 1 / 3, 1 / 3], 10) == [(0, 3), (3, 7), (7, 10)]
    # Python's round goes half to even: 1.5 -> 2 and 2.5 -> 2.
    assert split_document_ranges([0.5, 0.5, 0.0], 3) == [(0, 2), (2, 3), (3, 3)]
    assert split_document_ranges([0.5, 0.5, 0.0], 5) == [(0, 2), (2, 5), (5, 5)]
    assert split_document_ranges(parse_split("969,30,1"), 49) == [(0, 47), (47, 49), (49, 49)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = parse_split(",".join(str(w) for w in rng.integers(0, 100, 3) + [1, 0, 0]))
        n = int(rng.integers(0, 1000))
        ranges = split_document_ranges(weights, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


def test_each_split_reads_only_its_documents(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=1, num_documents=100, max_length=30))
    config = GPTDatasetConfig(seq_length=8, split="70,20,10")
    datasets = build_gpt_datasets(prefix, config, [None, None, None])
    ranges = split_document_ranges(parse_split("70,20,10"), 100)
    for dataset, (start, stop) in zip(datasets, ranges):
        assert set(np.unique(dataset.doc_idx)) <= set(range(start, stop))
        assert len(dataset) == (int(dataset.indexed.sizes[start:stop].sum()) - 1) // 8  # one epoch


def test_split_without_documents(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=2, num_documents=20, max_length=30))
    config = GPTDatasetConfig(seq_length=8, split="100,0,0")
    train, valid, test = build_gpt_datasets(prefix, config, [10, None, 0])
    assert len(train) >= 10 and valid is None and test is None
    with pytest.raises(UserError, match="valid split of --split 100,0,0 holds no documents") as err:
        build_gpt_datasets(prefix, config, [10, 5, 0])
    assert "\n" not in str(err.value)


def test_split_of_empty_documents_has_no_samples(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [[], [], [1, 2, 3]])
    config = GPTDatasetConfig(seq_length=8)
    assert len(GPTDataset(IndexedDataset(prefix), "train", (0, 2), None, config)) == 0
    with pytest.raises(UserError, match=r"holds only empty documents \[0, 2\) but 4 train samples"):
        GPTDataset(IndexedDataset(prefix), "train", (0, 2), 4, config)


def _epochs_by_counting(tokens_per_epoch, seq_length, num_samples):
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def test_plan_epochs_is_the_smallest_sufficient_count():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens, seq, n = int(rng.integers(1, 500)), int(rng.integers(1, 64)), int(rng.integers(0, 200))
        assert plan_epochs(tokens, seq, n)[0] == _epochs_by_counting(tokens, seq, n)
    # 1001 tokens = 100 samples of 10 per epoch; the 3rd epoch is needed for 1 sample (< 80%).
    assert plan_epochs(1001, 10, 201) == (3, True)
    assert plan_epochs(1001, 10, 290) == (3, False)  # 90 of 100 samples: shuffle all together
    assert plan_epochs(1001, 10, 100) == (1, False)


def test_separate_final_epoch_shuffles_the_last_epoch_on_its_own():
    sizes = np.full(50, 21, dtype=np.int32)  # 1050 tokens per epoch, 52 samples of 20
    documents = np.arange(10, 50)  # 40 documents, 840 tokens, 41 samples per epoch
    indices = build_gpt_indices(sizes, documents, seq_length=20, num_samples=45, seed=3)
    doc_idx, sample_idx, shuffle_idx = indices["doc_idx"], indices["sample_idx"], indices["shuffle_idx"]
    assert len(doc_idx) == 80
    assert sorted(doc_idx[40:]) == list(documents)  # the last epoch is a permutation on its own
    assert sorted(doc_idx[:40]) == list(documents)
    samples_first_epoch = (840 - 1) // 20
    total = (2 * 840 - 1) // 20
    assert len(sample_idx) == total + 1
    assert sorted(shuffle_idx[:samples_first_epoch]) == list(range(samples_first_epoch))
    assert sorted(shuffle_idx[samples_first_epoch:]) == list(range(samples_first_epoch, total))


def test_without_separate_final_epoch_all_epochs_shuffle_together():
    sizes = np.full(40, 21, dtype=np.int32)
    indices = build_gpt_indices(sizes, np.arange(40), seq_length=20, num_samples=80, seed=3)
    doc_idx = indices["doc_idx"]
    assert len(doc_idx) == 80 and sorted(doc_idx) == sorted(list(range(40)) * 2)
    # A joint shuffle puts some document twice in the first half (probability ~1 for 40 docs).
    assert len(set(doc_idx[:40].tolist())) < 40


def test_same_seed_same_indices_other_seed_other_order(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=4, num_documents=60, max_length=30))

    def indices(seed, cache):
        config = GPTDatasetConfig(seq_length=8, seed=seed, split="1", cache_path=str(tmp_path / cache))
        train = build_gpt_datasets(prefix, config, [300, None, None])[0]
        return train.doc_idx, train.shuffle_idx

    first, again, other = indices(7, "a"), indices(7, "b"), indices(8, "c")
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


def _cache_files(cache_dir):
    return sorted(p for p in os.listdir(cache_dir) if not p.startswith("."))


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path, caplog):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=5, num_documents=60, max_length=30))
    base = dict(seq_length=8, seed=1, split="90,10,0")
    cache_dir = tmp_path / "cache"  # the default: beside the data
    caplog.set_level(logging.DEBUG, logger="megagrow.data")

    first = build_gpt_datasets(prefix, GPTDatasetConfig(**base), [100, None, None])[0]
    files = _cache_files(cache_dir)
    assert len(files) == 2 * 4  # train and valid: a description and three arrays each
    caplog.clear()
    again = build_gpt_datasets(prefix, GPTDatasetConfig(**base), [100, None, None])[0]
    assert _cache_files(cache_dir) == files
    assert [r.getMessage().split()[0] for r in caplog.records] == ["loaded", "loaded"]
    np.testing.assert_array_equal(first.sample_idx, again.sample_idx)
    assert isinstance(again.sample_idx, np.memmap)

    keys = {first.cache_key}
    for change in (dict(seq_length=9), dict(seed=2), dict(split="80,20,0")):
        dataset = build_gpt_datasets(prefix, GPTDatasetConfig(**{**base, **change}), [100, None, None])[0]
        keys.add(dataset.cache_key)
    keys.add(build_gpt_datasets(prefix, GPTDatasetConfig(**base), [101, None, None])[0].cache_key)
    assert len(keys) == 5
    assert all(os.path.exists(cache_dir / f"{key}.json") for key in keys)


def test_partial_or_temporary_cache_files_are_never_read(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=6, num_documents=30, max_length=30))
    config = GPTDatasetConfig(seq_length=8, split="1", cache_path=str(tmp_path / "cache"))
    expected = build_gpt_datasets(prefix, config, [50, None, None])[0]
    reference = {name: np.array(getattr(expected, name)) for name in ("doc_idx", "sample_idx", "shuffle_idx")}
    key = expected.cache_key
    # An interrupted build: garbage arrays under the final names, no description, and temporaries.
    os.remove(tmp_path / "cache" / f"{key}.json")
    for name in reference:
        (tmp_path / "cache" / f"{key}-{name}.npy").write_bytes(b"\x93NUMPY garbage")
        (tmp_path / "cache" / f".{key}-{name}.npy.abc.tmp").write_bytes(b"partial")
    rebuilt = build_gpt_datasets(prefix, config, [50, None, None])[0]
    for name, array in reference.items():
        np.testing.assert_array_equal(getattr(rebuilt, name), array)


def test_corrupt_cache_with_description_is_a_user_error(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=6, num_documents=30, max_length=30))
    config = GPTDatasetConfig(seq_length=8, split="1")
    key = build_gpt_datasets(prefix, config, [50, None, None])[0].cache_key
    path = tmp_path / "cache" / f"{key}-sample_idx.npy"
    path.write_bytes(path.read_bytes()[:-8])  # truncated by hand, e.g. a bad copy
    with pytest.raises(UserError, match="delete .* and run again") as err:
        build_gpt_datasets(prefix, config, [50, None, None])
    assert "\n" not in str(err.value)


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=6, num_documents=30, max_length=30))
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    config = GPTDatasetConfig(seq_length=8, split="1", cache_path=str(blocker / "cache"))
    with pytest.raises(UserError, match="--data-cache-path"):
        build_gpt_datasets(prefix, config, [50, None, None])


def test_description_file_says_what_a_cache_entry_is(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=6, num_documents=30, max_length=30))
    dataset = GPTDataset(IndexedDataset(prefix), "train", (0, 30), 40, GPTDatasetConfig(seq_length=8, seed=9))
    record = index_cache.read_description(tmp_path / "cache", dataset.cache_key)
    assert record["kind"] == "gpt"
    assert record["description"]["seq_length"] == 8 and record["description"]["num_samples"] == 40
    assert record["description"]["prefix"] == os.path.abspath(prefix)
    assert record["arrays"]["sample_idx"]["shape"] == list(dataset.sample_idx.shape)


def test_bad_seq_length_is_a_user_error():
    with pytest.raises(UserError, match="--seq-length"):
        GPTDatasetConfig(seq_length=0)


def test_pickled_dataset_maps_the_cache_instead_of_copying_it(tmp_path):
    prefix = write_dataset(tmp_path / "ds", random_documents(seed=7, num_documents=200, max_length=60))
    dataset = build_gpt_datasets(prefix, GPTDatasetConfig(seq_length=8, split="1"), [3000, None, None])[0]
    payload = pickle.dumps(dataset)
    # What DataLoader workers started by "spawn" receive: no index arrays (the indexed
    # dataset's own pickle is its business).
    index_bytes = sum(getattr(dataset, name).nbytes for name in dataset.index_names)
    assert len(payload) < len(pickle.dumps(dataset.indexed)) + index_bytes // 4
    copy = pickle.loads(payload)
    assert isinstance(copy.shuffle_idx, np.memmap)
    for idx in (0, len(dataset) // 2, len(dataset) - 1):
        assert torch.equal(copy[idx]["tokens"], dataset[idx]["tokens"])
