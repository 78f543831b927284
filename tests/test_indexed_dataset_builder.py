"""IndexedDatasetBuilder's streamed index: bulk documents, rollback, blocks, and stale temporaries."""

import os

import numpy as np
import pytest

from megagrow.data import indexed_dataset
from megagrow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, stale_temporaries, write_index

RNG = np.random.default_rng(0)
DOCUMENTS = [RNG.integers(0, 60000, size=n) for n in RNG.integers(0, 40, size=300)]  # some empty


def one_at_a_time(prefix, documents):
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in documents:
            if len(doc):
                builder.add_item(doc)
            builder.end_document()


def files_of(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.mark.parametrize("block", [3, 1 << 18])
def test_bulk_documents_write_the_same_bytes_as_one_at_a_time(tmp_path, monkeypatch, block):
    monkeypatch.setattr(indexed_dataset, "_INDEX_BLOCK", block)  # tiny blocks: every boundary case is crossed
    one_at_a_time(tmp_path / "single", DOCUMENTS)
    with IndexedDatasetBuilder(tmp_path / "bulk", np.uint16) as builder:
        for start in range(0, len(DOCUMENTS), 37):
            part = DOCUMENTS[start : start + 37]
            builder.add_documents(np.concatenate(part), np.array([len(d) for d in part]))
    assert files_of(tmp_path / "bulk") == files_of(tmp_path / "single")
    dataset = IndexedDataset(tmp_path / "bulk")
    sizes = [len(d) for d in DOCUMENTS if len(d)]
    expected_idx = tmp_path / "expected.idx"
    write_index(str(expected_idx), np.uint16, sizes, [0, *np.cumsum([len(d) > 0 for d in DOCUMENTS])])
    assert files_of(tmp_path / "bulk")[1] == expected_idx.read_bytes()
    assert [dataset.document(i).tolist() for i in range(dataset.num_documents)] == [d.tolist() for d in DOCUMENTS]
    assert sorted(os.listdir(tmp_path)) == ["bulk.bin", "bulk.idx", "expected.idx", "single.bin", "single.idx"]


def test_rollback_drops_everything_after_the_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_dataset, "_INDEX_BLOCK", 4)
    with IndexedDatasetBuilder(tmp_path / "kept", np.uint16) as builder:
        for doc in DOCUMENTS[:50] + DOCUMENTS[90:]:
            builder.add_document(doc)
    with IndexedDatasetBuilder(tmp_path / "rolled", np.uint16) as builder:
        for doc in DOCUMENTS[:50]:
            builder.add_document(doc)
        mark = builder.mark()
        for doc in DOCUMENTS[50:90]:
            builder.add_document(doc)
        builder.rollback(mark)
        for doc in DOCUMENTS[90:]:
            builder.add_document(doc)
    assert files_of(tmp_path / "rolled") == files_of(tmp_path / "kept")


def test_merging_many_blocks_keeps_documents_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_dataset, "_INDEX_BLOCK", 5)
    one_at_a_time(tmp_path / "a", DOCUMENTS[:120])
    one_at_a_time(tmp_path / "b", DOCUMENTS[120:])
    one_at_a_time(tmp_path / "whole", DOCUMENTS)
    with IndexedDatasetBuilder(tmp_path / "merged", np.uint16) as builder:
        builder.add_index(tmp_path / "a")
        builder.add_index(tmp_path / "b")
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "whole")


def test_stale_temporaries_are_those_of_other_processes(tmp_path):
    builder = IndexedDatasetBuilder(tmp_path / "out", np.uint16)  # this process's own, in progress
    left = [tmp_path / "out.bin.tmp-123", tmp_path / "out.sizes.tmp-123", tmp_path / "other.bin.tmp-9"]
    for path in left:
        path.write_bytes(b"x")
    assert stale_temporaries([tmp_path / "out", tmp_path / "absent_dir" / "x"]) == [str(left[0]), str(left[1])]
    builder.abort()


def test_streamed_index_is_byte_identical_to_megatron_cores(tmp_path, monkeypatch):
    megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    monkeypatch.setattr(indexed_dataset, "_INDEX_BLOCK", 7)
    halves = (DOCUMENTS[:130], DOCUMENTS[130:])
    for name, documents in zip(("a", "b"), halves):
        # As Megatron-LM's tools/preprocess_data.py: an empty document is one without sequences.
        builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / f"mc_{name}.bin"), dtype=np.uint16)
        for doc in documents:
            builder.add_document(doc.tolist(), [len(doc)] if len(doc) else [])
        builder.finalize(str(tmp_path / f"mc_{name}.idx"))
        with IndexedDatasetBuilder(tmp_path / f"ours_{name}", np.uint16) as ours:
            ours.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
        assert files_of(tmp_path / f"ours_{name}") == files_of(tmp_path / f"mc_{name}")
    merged = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "mc_ab.bin"), dtype=np.uint16)
    for name in ("a", "b"):
        merged.add_index(str(tmp_path / f"mc_{name}"))
    merged.finalize(str(tmp_path / "mc_ab.idx"))
    with IndexedDatasetBuilder(tmp_path / "ours_ab", np.uint16) as ours:
        for name in ("a", "b"):
            ours.add_index(tmp_path / f"ours_{name}")
    assert files_of(tmp_path / "ours_ab") == files_of(tmp_path / "mc_ab")
