"""Blends: --data-path parsing, the blending order and its balance, samples, counts and caching."""

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_factory import random_documents, write_dataset
from megagrow.arguments import parse_args
from megagrow.data.blended_dataset import (
    BlendComponent,
    BlendedDataset,
    blend_sample_counts,
    blend_shares,
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


def _prefix_counts(dataset_index, num_datasets):
    """counts[n - 1, d]: samples of dataset d among the first n of the blend."""
    return np.cumsum(np.eye(num_datasets, dtype=np.int64)[dataset_index], axis=0)


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10).filter(lambda w: sum(w) > 1e-3),
    size=st.integers(0, 2000),
    rule=st.sampled_from(["megatron", "tijdeman"]),
)
def test_cpp_blend_equals_the_reference_and_counts_up(weights, size, rule):
    weights = np.asarray(weights) / sum(weights)
    dataset_index, dataset_sample_index = build_blending_indices(weights, size, rule)
    reference = build_blending_indices_loop(weights, min(size, 300), rule)
    np.testing.assert_array_equal(dataset_index[:300], reference[0])
    np.testing.assert_array_equal(dataset_sample_index[:300], reference[1])
    counts = _prefix_counts(dataset_index, len(weights))
    assert not np.any((weights == 0)[dataset_index])  # a dataset of weight 0 is never chosen
    for d in range(len(weights)):  # sample indices count up per dataset
        expected = np.arange(counts[-1, d] if size else 0)
        np.testing.assert_array_equal(dataset_sample_index[dataset_index == d], expected)
    if rule == "tijdeman":
        # Tijdeman's bound: 1 - 1/(2k - 2) for k datasets of positive weight, so always < 1.
        excess = counts - np.outer(np.arange(1, size + 1), weights)
        k = int(np.count_nonzero(weights))
        bound = 1 - 1 / (2 * k - 2) if k > 1 else 0.0
        assert np.abs(excess).max(initial=0) <= bound + 1e-9


def test_tijdeman_keeps_four_datasets_within_one_sample_where_megatron_does_not():
    # Weights 3:99:7:99: after 15 samples megatron-core's rule has given the last dataset
    # 1.14 samples more than its share; Tijdeman's rule stays within 1 - 1/6 everywhere.
    weights = np.array([3, 99, 7, 99]) / 208
    deviation = {}
    for rule in ("megatron", "tijdeman"):
        dataset_index, _ = build_blending_indices(weights, 2000, rule)
        lag = np.outer(np.arange(1, 2001), weights) - _prefix_counts(dataset_index, 4)
        deviation[rule] = np.abs(lag).max(axis=1)
    assert deviation["megatron"][14] > 1.1
    assert deviation["tijdeman"].max() <= 1 - 1 / 6 + 1e-9


def test_blend_rule_is_checked():
    with pytest.raises(ValueError, match="rule must be 'megatron' or 'tijdeman'"):
        build_blending_indices(np.array([0.5, 0.5]), 10, "argmax")
    with pytest.raises(UserError, match="--blend-rule 'argmax': choose one of megatron, tijdeman"):
        BlendedDataset([None, None], [0.5, 0.5], 10, "unused", rule="argmax")


def test_blend_rule_flag_reaches_the_data_config():
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--mock-data"]
    assert parse_args(flags).data.blend_rule == "megatron"
    assert parse_args([*flags, "--blend-rule", "tijdeman"]).data.blend_rule == "tijdeman"
    with pytest.raises(UserError, match="--blend-rule 'argmax': choose one of megatron, tijdeman"):
        parse_args([*flags, "--blend-rule", "argmax"])


def test_blend_sample_counts_are_megatron_cores():
    # Shares ceil(N * w_d) sum to the blend's length; each dataset builds 0.5% more, rounded up.
    assert blend_shares([0.7, 0.3], 1000) == [700, 300]
    assert blend_sample_counts([0.7, 0.3], 1000) == [math.ceil(700 * 1.005), math.ceil(300 * 1.005)]
    assert blend_shares([1 / 3] * 3, 10) == [4, 4, 4]
    assert blend_sample_counts([1 / 3] * 3, 10) == [5, 5, 5]
    assert blend_sample_counts([0.5, 0.5], None) == [None, None]


def test_blend_returns_the_samples_it_points_to(tmp_path, prefixes, caplog):
    config = GPTDatasetConfig(seq_length=16, seed=2, split="90,10,0")
    data_path = ["0.5", prefixes[0], "0.3", prefixes[1], "0.2", prefixes[2]]
    train, valid, test = build_blended_datasets(data_path, config, [401, 30, 0])
    # Shares ceil(401 * w) = 201, 121, 81 (sum 403) and ceil(30 * w) = 15, 9, 6.
    assert isinstance(train, BlendedDataset) and len(train) == 403 and len(valid) == 30 and test is None
    for d, (dataset, share) in enumerate(zip(train.datasets, [201, 121, 81])):
        assert isinstance(dataset, GPTDataset) and dataset.num_samples == math.ceil(share * 1.005)
        assert abs(np.count_nonzero(train.dataset_index == d) - share) <= 1
    for k in range(len(train)):
        item = train[k]
        d, s = int(train.dataset_index[k]), int(train.dataset_sample_index[k])
        assert item["dataset_id"] == d
        np.testing.assert_array_equal(item["tokens"].numpy(), train.datasets[d][s]["tokens"].numpy())

    caplog.set_level(logging.DEBUG, logger="megagrow.data")
    again = build_blended_datasets(data_path, config, [401, 30, 0])[0]
    assert {r.getMessage().split()[0] for r in caplog.records} == {"loaded"}
    assert again.cache_key == train.cache_key
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)
    reweighted = ["0.4", prefixes[0], "0.4", prefixes[1], "0.2", prefixes[2]]
    assert build_blended_datasets(reweighted, config, [401, 30, 0])[0].cache_key != train.cache_key
    tijdeman = build_blended_datasets(data_path, config, [401, 30, 0], blend_rule="tijdeman")[0]
    assert tijdeman.cache_key != train.cache_key and len(tijdeman) == 403


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
