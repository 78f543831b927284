"""Megatron .bin/.idx format: exact bytes, zero-copy reads, and clear errors on corrupt files."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megagrow.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    token_dtype_for_vocab,
)
from megagrow.errors import UserError

# Two documents [1, 2, 3] and [65000] as uint16, written out by hand from the format spec.
EXPECTED_IDX = bytes.fromhex(
    "4d4d494449445800 00"        # magic b"MMIDIDX\0\0"
    "0100000000000000"           # version 1
    "08"                         # dtype code 8 = uint16
    "0200000000000000"           # 2 sequences
    "0300000000000000"           # 3 document indices
    "03000000 01000000"          # sizes int32
    "0000000000000000 0600000000000000"  # pointers int64 (bytes)
    "0000000000000000 0100000000000000 0200000000000000"  # document indices int64
)
EXPECTED_BIN = bytes.fromhex("0100 0200 0300 e8fd")


def _write_example(prefix):
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document([1, 2, 3])
        builder.add_document([65000])


def test_builder_writes_megatron_bytes_exactly(tmp_path):
    prefix = tmp_path / "ex"
    _write_example(prefix)
    assert (tmp_path / "ex.idx").read_bytes() == EXPECTED_IDX
    assert (tmp_path / "ex.bin").read_bytes() == EXPECTED_BIN
    assert sorted(os.listdir(tmp_path)) == ["ex.bin", "ex.idx"]  # no temporaries left


def test_reader_parses_hand_written_files(tmp_path):
    (tmp_path / "hand.idx").write_bytes(EXPECTED_IDX)
    (tmp_path / "hand.bin").write_bytes(EXPECTED_BIN)
    ds = IndexedDataset(tmp_path / "hand")
    assert len(ds) == 2 and ds.num_documents == 2 and ds.num_tokens == 4
    assert ds.dtype == np.uint16
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [65000]
    assert ds.get(0, offset=1, length=2).tolist() == [2, 3]
    assert isinstance(ds[0].base, np.memmap) or isinstance(ds[0], np.memmap)  # a view, not a copy
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)


def test_sentence_level_sequences_and_documents(tmp_path):
    prefix = tmp_path / "sent"
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        builder.add_document([5, 6, 7, 8, 9], lengths=[2, 3])
        builder.add_document([10])
    ds = IndexedDataset(prefix)
    assert ds.sizes.tolist() == [2, 3, 1]
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.document(0).tolist() == [5, 6, 7, 8, 9]
    assert ds.document(1).tolist() == [10]


def test_pickles_by_path_not_by_content(tmp_path):
    import pickle

    with IndexedDatasetBuilder(tmp_path / "big", np.uint16) as builder:
        builder.add_document(np.arange(50_000) % 60000)
    ds = IndexedDataset(tmp_path / "big")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob)[0].tolist() == ds[0].tolist()


def test_token_dtype_follows_vocab_size():
    assert token_dtype_for_vocab(32000) is np.uint16
    assert token_dtype_for_vocab(65499) is np.uint16
    assert token_dtype_for_vocab(65500) is np.int32
    assert token_dtype_for_vocab(128256) is np.int32


def test_random_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 128000, size=rng.integers(0, 50)) for _ in range(200)]
    with IndexedDatasetBuilder(tmp_path / "r", np.int32) as builder:
        for doc in docs:
            builder.add_document(doc)
    ds = IndexedDataset(tmp_path / "r")
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in docs]


def test_failed_build_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "half", np.uint16) as builder:
            builder.add_document([1, 2])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda idx, bin_: idx.write_bytes(b"NOTANIDX!" + EXPECTED_IDX[9:]), "bad magic"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:9] + (2).to_bytes(8, "little") + EXPECTED_IDX[17:]), "version 2"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:17] + b"\x09" + EXPECTED_IDX[18:]), "unknown dtype code"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:-8]), "truncated"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:10]), "truncated"),
        (lambda idx, bin_: bin_.write_bytes(EXPECTED_BIN[:-2]), "truncated or mismatched"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:50] + (8).to_bytes(8, "little") + EXPECTED_IDX[58:]), "pointer of sequence 1"),
        (lambda idx, bin_: idx.write_bytes(EXPECTED_IDX[:-8] + (5).to_bytes(8, "little")), "document indices"),
        (lambda idx, bin_: bin_.unlink(), "not found"),
    ],
)
def test_corrupt_files_fail_with_a_clear_error_naming_the_file(tmp_path, corrupt, message):
    prefix = tmp_path / "ex"
    _write_example(prefix)
    corrupt(tmp_path / "ex.idx", tmp_path / "ex.bin")
    with pytest.raises(UserError) as info:
        IndexedDataset(prefix)
    text = str(info.value)
    assert message in text
    assert str(prefix) in text and "\n" not in text


def test_missing_extension_gives_build_instructions(tmp_path):
    # Import the data package with megagrow._helpers hidden, in a fresh interpreter.
    code = (
        "import sys; sys.modules['megagrow._helpers'] = None\n"
        "try:\n    import megagrow.data\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install -e ." in out and "megagrow._helpers" in out
