"""Blends: --data-path parsing, the blending order and its balance, samples, counts and caching."""

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_factory import random_documents, write_dataset
from megagrow.data.blended_dataset import (
    BlendComponent,
    BlendedDataset,
    blend_sample_counts,
    build_blended_datasets,
    parse_data_path,
)
from megagrow.data.gpt_dataset import GPTDataset, GPTDatasetConfig, build_gpt_datasets
from megagrow.data.index_reference import build_blending_indices_loop
from megagrow.data.native import build_blending_indices
from megagrow.errors import UserError


@pytest.fixture
def prefixes(tmp_path):
    """Three small datasets of different lengths."""
    return [
        write_dataset(tmp_path / name, random_documents(seed=seed, num_documents=40, max_length=length))
        for seed, (name, length) in enumerate([("code", 60), ("prose", 30), ("math", 45)])
    ]


def test_single_prefix_and_pairs(prefixes):
    assert parse_data_path([prefixes[0]]) == [BlendComponent(1.0, prefixes[0])]
    components = parse_data_path(["3", prefixes[0], "1", prefixes[1]])
    assert [c.prefix for c in components] == prefixes[:2]
    assert [c.weight for c in components] == pytest.approx([0.75, 0.25])


def test_mix_file_with_comments_and_relative_prefixes(tmp_path, prefixes):
    mix = tmp_path / "mix.txt"
    mix.write_text(f"# domain mix\n\n0.7 code   # relative to this file\n0.3 {prefixes[1]}\n")
    components = parse_data_path([f"@{mix}"])
    assert components == [BlendComponent(0.7, prefixes[0]), BlendComponent(0.3, prefixes[1])]


@pytest.mark.parametrize(
    "items, message",
    [
        (["0.5", "A", "0.5"], "3 values; a blend is weight/prefix pairs"),
        (["x", "A", "0.5", "B"], "weight 'x' is not a number"),
        (["-1", "A", "2", "B"], "must be a finite number >= 0"),
        (["inf", "A", "1", "B"], "must be a finite number >= 0"),
        (["0", "A", "0", "B"], "sum to 0"),
        (["1", "A", "1", "missing/ds"], r"dataset not found: .*missing/ds \(--data-path\)"),
        ([], "no dataset given"),
    ],
)
def test_bad_data_path_is_a_one_line_user_error(prefixes, items, message):
    items = [prefixes[0] if item == "A" else prefixes[1] if item == "B" else item for item in items]
    with pytest.raises(UserError, match=message) as err:
        parse_data_path(items)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.5 code\n0.5\n", r"mix.txt:2: expected 'weight prefix'"),
        ("0.5 code\nhalf prose\n", r"mix.txt:2: weight 'half' is not a number"),
        ("# nothing\n", "lists no datasets"),
        ("1 code\n1 nowhere\n", r"nowhere \(.*mix.txt:2\)"),
    ],
)
def test_bad_mix_file_names_the_line(tmp_path, prefixes, text, message):
    (tmp_path / "mix.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        parse_data_path([f"@{tmp_path / 'mix.txt'}"])
    with pytest.raises(UserError, match="cannot read the mix file"):
        parse_data_path([f"@{tmp_path / 'absent.txt'}"])


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8).filter(lambda w: sum(w) > 1e-3),
    size=st.integers(0, 2000),
)
def test_blend_stays_within_one_sample_of_the_weights(weights, size):
    weights = np.asarray(weights) / sum(weights)
    dataset_index, dataset_sample_index = build_blending_indices(weights, size)
    reference = build_blending_indices_loop(weights, min(size, 300))
    np.testing.assert_array_equal(dataset_index[:300], reference[0])
    np.testing.assert_array_equal(dataset_sample_index[:300], reference[1])

    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[dataset_index], axis=0)  # counts[n-1, d]
    excess = counts - np.outer(np.arange(1, size + 1), weights)
    # Tijdeman's bound: 1 - 1/(2k - 2) for k datasets of positive weight, so always < 1.
    k = int(np.count_nonzero(weights))
    bound = 1 - 1 / (2 * k - 2) if k > 1 else 0.0
    assert np.abs(excess).max(initial=0) <= bound + 1e-9
    for d in range(len(weights)):  # sample indices count up per dataset
        expected = np.arange(counts[-1, d] if size else 0)
        np.testing.assert_array_equal(dataset_sample_index[dataset_index == d], expected)


def test_blend_keeps_four_datasets_within_one_sample_where_argmax_does_not():
    # With weights 3:99:7:99, always picking the largest lag leaves dataset 3 more than one
    # sample behind after 166 samples; the rule used here never does.
    weights = np.array([3, 99, 7, 99]) / 208
    dataset_index, _ = build_blending_indices(weights, 2000)
    counts = np.cumsum(np.eye(4, dtype=np.int64)[dataset_index], axis=0)
    lag = np.outer(np.arange(1, 2001), weights) - counts
    assert np.abs(lag).max() < 1
    argmax_counts = np.zeros(4)
    for n in range(1, 167):
        argmax_counts[np.argmax(weights * n - argmax_counts)] += 1
    assert 166 * weights[3] - argmax_counts[3] > 1


def test_blend_sample_counts_add_the_margin():
    assert blend_sample_counts([0.7, 0.3], 1000) == [math.ceil(0.7 * 1000 * 1.005), math.ceil(0.3 * 1000 * 1.005)]
    assert blend_sample_counts([0.5, 0.5], None) == [None, None]


def test_blend_returns_the_samples_it_points_to(tmp_path, prefixes, caplog):
    config = GPTDatasetConfig(seq_length=16, seed=2, split="90,10,0")
    data_path = ["0.5", prefixes[0], "0.3", prefixes[1], "0.2", prefixes[2]]
    train, valid, test = build_blended_datasets(data_path, config, [400, 30, 0])
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 30 and test is None
    for d, (dataset, weight) in enumerate(zip(train.datasets, [0.5, 0.3, 0.2])):
        assert isinstance(dataset, GPTDataset) and dataset.num_samples == math.ceil(weight * 400 * 1.005)
        assert abs(np.count_nonzero(train.dataset_index == d) - weight * 400) <= 1
    for k in range(len(train)):
        item = train[k]
        d, s = int(train.dataset_index[k]), int(train.dataset_sample_index[k])
        assert item["dataset_id"] == d
        np.testing.assert_array_equal(item["tokens"].numpy(), train.datasets[d][s]["tokens"].numpy())

    caplog.set_level(logging.INFO, logger="megagrow.data")
    again = build_blended_datasets(data_path, config, [400, 30, 0])[0]
    assert {r.getMessage().split()[0] for r in caplog.records} == {"loaded"}
    assert again.cache_key == train.cache_key
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)
    reweighted = ["0.4", prefixes[0], "0.4", prefixes[1], "0.2", prefixes[2]]
    assert build_blended_datasets(reweighted, config, [400, 30, 0])[0].cache_key != train.cache_key


def test_single_prefix_gives_plain_gpt_datasets(prefixes):
    config = GPTDatasetConfig(seq_length=16, split="1")
    assert isinstance(build_blended_datasets([prefixes[0]], config, [50, None, None])[0], GPTDataset)


def test_blend_without_size_takes_what_the_datasets_hold(tmp_path, prefixes):
    config = GPTDatasetConfig(seq_length=16, split="1")
    datasets = [build_gpt_datasets(p, config, [None, None, None])[0] for p in prefixes[:2]]
    blend = BlendedDataset(datasets, [0.5, 0.5], None, tmp_path / "blend-cache")
    lengths = [len(d) for d in datasets]
    assert len(blend) >= 2 * min(lengths) - 1
    for d in range(2):  # nothing past the end of any dataset
        assert np.all(blend.dataset_sample_index[blend.dataset_index == d] < lengths[d])
