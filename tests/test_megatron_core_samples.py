"""megagrow's GPT samples and blends against megatron-core 0.16.1's, built from the same files, seed and split.

megatron-core is a test-only dependency (installed with `pip install --no-deps
megatron-core==0.16.1 psutil`). Its builder runs here without a process group:
with `path_to_cache=None` it neither barriers nor asks for a rank (its GPT indices
go to `cache/` beside each dataset, its blend indices stay in memory).
"""

import faulthandler
import math
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
from megatron.core.datasets import helpers as megatron_helpers  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronGPTDatasetConfig  # noqa: E402
from megatron.core.datasets.utils import normalize as megatron_normalize  # noqa: E402

from data_factory import write_dataset  # noqa: E402
from megagrow.data.blended_dataset import BlendedDataset, build_blended_datasets  # noqa: E402
from megagrow.data.gpt_dataset import GPTDataset, GPTDatasetConfig, parse_split, split_document_ranges  # noqa: E402
from megagrow.data.native import build_blending_indices  # noqa: E402

SEQ_LENGTH = 16
# megatron-core loops forever in GPTDataset._get_num_epochs when a split holds no tokens;
# the data below rules that out, and this kills the run with a traceback should it happen.
HANG_GUARD_S = 120


def _documents(seed: int, num_documents: int) -> list[np.ndarray]:
    """1-40 random tokens each, except every 7th document, which is empty (real data has those).

    Two neighbouring documents are never both empty, so any split of 3 or more
    documents holds tokens.
    """
    rng = np.random.default_rng(seed)
    return [np.zeros(0, dtype=np.int64) if i % 7 == 3 else rng.integers(0, 1000, rng.integers(1, 41))
            for i in range(num_documents)]


def _old_split_ranges(weights, num_documents):
    """Megatron-LM's rule before megatron-core: round each share, move the error into the first split."""
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + round(weight * num_documents))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


@contextmanager
def _hang_guard():
    """Exit with every thread's traceback if the block runs past HANG_GUARD_S (the builder uses threads)."""
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _megatron_core_datasets(prefixes, weights, split, sizes, seed):
    """megatron-core's train/valid/test datasets, as Megatron-LM's pretrain_gpt.py builds them."""
    # vocab_size None: the token dtype comes from the .idx file; pad -1 never occurs, so no
    # token is masked or replaced; eod only shapes masks, which are not compared.
    tokenizer = types.SimpleNamespace(vocab_size=None, eod=0, pad=-1, unique_identifiers={"class": "NoTokenizer"})
    config = MegatronGPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ_LENGTH, blend=(prefixes, weights), split=split,
        path_to_cache=None, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False,
    )
    with _hang_guard():
        return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def _megatron_core_tokens(item) -> np.ndarray:
    """The seq_length + 1 tokens of a megatron-core sample: its tokens and the last label."""
    return torch.cat([item["tokens"], item["labels"][-1:]]).numpy()


def _assert_same_samples(ours, theirs, blended: bool):
    assert len(ours) == len(theirs)
    for idx in range(len(ours)):
        mine, reference = ours[idx], theirs[idx]
        np.testing.assert_array_equal(mine["tokens"].numpy(), _megatron_core_tokens(reference), err_msg=f"sample {idx}")
        if blended:
            assert mine["dataset_id"] == int(reference["dataset_id"]), f"sample {idx}"


@pytest.mark.parametrize("split, num_documents", [("80,15,5", 63), ("80,15,5", 111), ("90,8,2", 166),
                                                  ("969,30,1", 3049)])
def test_single_dataset_samples_equal_megatron_cores(tmp_path, split, num_documents):
    weights = parse_split(split)
    assert min(w for w in weights if w > 0) * num_documents >= 3  # every split holds tokens
    # The split cuts elsewhere under the old rounding, so these samples differed before.
    assert _old_split_ranges(weights, num_documents) != split_document_ranges(weights, num_documents)
    documents = _documents(num_documents, num_documents)
    prefix = write_dataset(tmp_path / "ds", documents)
    sizes = [3 * sum(map(len, documents)) // SEQ_LENGTH, 20, 2]  # train: more than three epochs
    ours = build_blended_datasets([prefix], GPTDatasetConfig(SEQ_LENGTH, seed=11, split=split,
                                                             cache_path=str(tmp_path / "cache")), sizes)
    theirs = _megatron_core_datasets([prefix], None, split, sizes, seed=11)
    for mine, reference in zip(ours, theirs):
        assert isinstance(mine, GPTDataset)
        # The cached indices are the same arrays, dtypes included.
        for name, other in (("doc_idx", "document_index"), ("sample_idx", "sample_index"),
                            ("shuffle_idx", "shuffle_index")):
            a, b = np.asarray(getattr(mine, name)), np.asarray(getattr(reference, other))
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        _assert_same_samples(mine, reference, blended=False)
    assert len(ours[0].doc_idx) > 3 * len(np.unique(ours[0].doc_idx))


@pytest.mark.parametrize(
    "weights, sizes",
    [
        (["2", "1"], [301, 31, 4]),  # shares of 1/3 and 2/3: ceil rounds both up
        (["0.5", "0.3", "0.2"], [901, 40, 5]),
    ],
)
def test_blend_samples_equal_megatron_cores(tmp_path, weights, sizes):
    split = "80,15,5"
    counts = [111, 148, 132][: len(weights)]
    for n in counts:  # each dataset's split differs from the old rounding
        assert _old_split_ranges(parse_split(split), n) != split_document_ranges(parse_split(split), n)
    prefixes = [write_dataset(tmp_path / f"ds{i}", _documents(100 + i, n)) for i, n in enumerate(counts)]
    data_path = [item for pair in zip(weights, prefixes) for item in pair]
    ours = build_blended_datasets(data_path, GPTDatasetConfig(SEQ_LENGTH, seed=5, split=split,
                                                              cache_path=str(tmp_path / "cache")), sizes)
    theirs = _megatron_core_datasets(prefixes, [float(w) for w in weights], split, sizes, seed=5)
    normalised = megatron_normalize([float(w) for w in weights])
    for mine, reference, size in zip(ours, theirs, sizes):
        assert isinstance(mine, BlendedDataset)
        # The length is the sum of the rounded-up shares, more than asked for.
        assert len(mine) == sum(math.ceil(size * w) for w in normalised)
        _assert_same_samples(mine, reference, blended=True)
        for dataset, their_dataset in zip(mine.datasets, reference.datasets):
            assert dataset.num_samples == their_dataset.num_samples
    assert len(ours[0]) > sizes[0]
    # Several epochs of at least one dataset in the training blend.
    assert any(len(d.doc_idx) > 2 * len(np.unique(d.doc_idx)) for d in ours[0].datasets)


WEIGHTS = [[1.0], [1, 1], [2, 1], [1, 1, 1], [3, 99, 7, 99], [0.2] * 5, [5, 1, 1, 1, 1, 1],
           list(range(1, 9)), [1] * 12, list(np.random.default_rng(0).dirichlet(np.ones(40)))]


@pytest.mark.parametrize("raw", WEIGHTS, ids=lambda raw: f"{len(raw)}-datasets")
def test_blending_order_equals_megatron_cores_helper(raw):
    # Normalised twice, as megatron-core's builder and then its BlendedDataset do.
    weights = megatron_normalize(megatron_normalize(raw))
    size = 30_000
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    megatron_helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights), size, False)
    ours = build_blending_indices(np.array(weights), size)
    np.testing.assert_array_equal(ours[0], dataset_index)
    np.testing.assert_array_equal(ours[1], dataset_sample_index)
