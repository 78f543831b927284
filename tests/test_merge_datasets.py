"""tools/merge_datasets.py and tools/dataset_stats.py on datasets of real tokenized text."""

import numpy as np
import pytest
from fixtures_text import call_quietly, load_tool, read_jsonl_texts, run_tool

from megagrow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megagrow.data.tokenizer import SentencePieceTokenizer

merge_datasets = load_tool("merge_datasets")
dataset_stats = load_tool("dataset_stats")


@pytest.fixture(scope="module")
def shards(small_corpus, tiny_tokenizer_model, tmp_path_factory):
    """Three uint16 datasets of real text: documents of one and of several sequences, and empty ones."""
    tokenizer = SentencePieceTokenizer(tiny_tokenizer_model)
    texts = read_jsonl_texts(small_corpus / "prose.jsonl")[:15]
    directory = tmp_path_factory.mktemp("shards")
    documents = {}
    for shard, part in zip(("b_shard", "a_shard", "c_shard"), (texts[:6], texts[6:7], texts[7:])):
        prefix = str(directory / shard)
        documents[prefix] = []
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            for i, text in enumerate(part):
                ids = tokenizer.encode(text)
                if i == 1:
                    builder.end_document()  # a document without sequences
                    documents[prefix].append([])
                elif i % 2 == 0 and len(ids) > 3:
                    builder.add_document(ids, lengths=[2, len(ids) - 2])  # a document of two sequences
                    documents[prefix].append(ids)
                else:
                    builder.add_document(ids)
                    documents[prefix].append(ids)
    return directory, documents


def test_merged_dataset_is_the_concatenation(shards, tmp_path):
    directory, documents = shards
    prefixes = [str(directory / name) for name in ("c_shard", "a_shard", "b_shard")]
    merged = call_quietly(merge_datasets.main, ["--input", *prefixes, "--output-prefix", tmp_path / "merged"])
    inputs = [IndexedDataset(p) for p in prefixes]
    assert np.array_equal(merged.sizes, np.concatenate([d.sizes for d in inputs]))
    expected_indices, base = [0], 0
    for d in inputs:
        expected_indices += (d.document_indices[1:] + base).tolist()
        base += len(d)
    assert merged.document_indices.tolist() == expected_indices
    expected_documents = [doc for p in prefixes for doc in documents[p]]
    assert merged.num_documents == len(expected_documents)
    assert [merged.document(i).tolist() for i in range(merged.num_documents)] == expected_documents
    assert (tmp_path / "merged.bin").read_bytes() == b"".join((directory / f"{p}.bin").read_bytes() for p in prefixes)


def test_input_dir_merges_in_name_order(shards, tmp_path):
    directory, documents = shards
    merged = call_quietly(merge_datasets.main, ["--input-dir", directory, "--output-prefix", tmp_path / "merged"])
    expected = [doc for name in ("a_shard", "b_shard", "c_shard") for doc in documents[str(directory / name)]]
    assert [merged.document(i).tolist() for i in range(merged.num_documents)] == expected


def test_mismatched_dtypes_are_refused_in_one_line(shards, tmp_path):
    directory, _ = shards
    with IndexedDatasetBuilder(tmp_path / "wide", np.int32) as builder:
        builder.add_document([70000, 1, 2])
    result = run_tool(
        "merge_datasets", "--input", directory / "a_shard", tmp_path / "wide", "--output-prefix", tmp_path / "merged"
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "different token dtypes" in line and "a_shard (uint16)" in line and "wide (int32)" in line
    assert not list(tmp_path.glob("merged*"))


def test_missing_input_is_one_line(tmp_path):
    result = run_tool("merge_datasets", "--input", tmp_path / "absent", "--output-prefix", tmp_path / "merged")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "dataset file not found" in result.stderr


def test_unwritable_output_is_one_line(shards, tmp_path):
    directory, _ = shards
    (tmp_path / "a_file").write_text("not a directory")
    result = run_tool("merge_datasets", "--input", directory / "a_shard", "--output-prefix", tmp_path / "a_file" / "merged")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot write" in result.stderr and "--output-prefix" in result.stderr


def test_dataset_stats_counts_documents_and_tokens(shards):
    directory, documents = shards
    prefix = str(directory / "b_shard")
    [row] = call_quietly(dataset_stats.main, [prefix])
    lengths = [len(d) for d in documents[prefix]]
    dataset = IndexedDataset(prefix)
    assert (row.documents, row.sequences, row.tokens) == (len(lengths), len(dataset), sum(lengths))
    assert (row.min_document_tokens, row.max_document_tokens) == (0, max(lengths))
    assert row.mean_document_tokens == pytest.approx(np.mean(lengths))
    assert row.dtype == "uint16"


def test_dataset_stats_prints_a_table_with_a_total(shards):
    directory, _ = shards
    result = run_tool("dataset_stats", directory / "a_shard", directory / "c_shard")
    assert result.returncode == 0, result.stderr
    header, first, second, total = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["dataset", "dtype", "sequences"] and total.startswith("total")
    assert "a_shard" in first and "c_shard" in second
