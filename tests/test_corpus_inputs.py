"""megagrow.data.corpus_inputs and corpus_shards: finding corpus files, reading every format, batching, sharding."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megagrow.data.corpus_inputs import (
    CorpusFile,
    InputFile,
    ParquetRows,
    UnreadableFile,
    batch_records,
    find_corpus_files,
    open_records,
    per_input_names,
)
from megagrow.data.corpus_shards import ShardSpec, check_complete_shard_sets, files_of_shard, shard_from_flags
from megagrow.errors import UserError

LINES = [json.dumps({"text": f"document {i} " + "word " * (i % 7)}).encode() + b"\n" for i in range(500)]


def touch(path, data=b"{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_directories_globs_and_files_give_one_sorted_list(tmp_path):
    names = ["b/2.jsonl.zst", "b/10.parquet", "a.jsonl", "c/deep/x.json.gz", "b/notes.txt", ".hidden/y.jsonl", "b/.z.jsonl",
             "b/dataset_info.json"]
    for name in names:
        touch(tmp_path / name)
    odd = touch(tmp_path / "odd_name.data")
    found = find_corpus_files([str(tmp_path / "b"), str(tmp_path / "c" / "**" / "*.gz"), str(tmp_path / "*.jsonl"), odd,
                               str(tmp_path / "b" / "2.jsonl.zst")])  # the last one again: listed once
    rel = [f.path[len(str(tmp_path)) + 1 :] for f in found]
    assert rel == ["a.jsonl", "b/10.parquet", "b/2.jsonl.zst", "c/deep/x.json.gz", "odd_name.data"]
    assert all(f.size == 3 for f in found)
    everything = [f.path[len(str(tmp_path)) + 1 :] for f in find_corpus_files([str(tmp_path)])]
    assert everything == ["a.jsonl", "b/10.parquet", "b/2.jsonl.zst", "c/deep/x.json.gz"]  # no hidden, .txt, bare .json
    assert [f.path for f in find_corpus_files([str(tmp_path / "b" / "dataset_info.json")])] == [
        str(tmp_path / "b" / "dataset_info.json")]  # named explicitly: read


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("missing.jsonl", "input file not found: {tmp}/missing.jsonl"),
        ("*.zst", "--input {tmp}/*.zst: the pattern matches no"),
        ("empty_dir", "--input {tmp}/empty_dir: no .jsonl"),
    ],
)
def test_inputs_that_name_nothing_are_refused(tmp_path, pattern, message):
    (tmp_path / "empty_dir").mkdir()
    touch(tmp_path / "empty_dir" / "readme.md")
    with pytest.raises(UserError, match="^" + message.format(tmp=tmp_path).replace("*", r"\*").replace(".", r"\.")):
        find_corpus_files([str(tmp_path / pattern)])


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_data_of_several_frames_reads_every_line(tmp_path, kind):
    data = b"".join(LINES)
    compress = gzip.compress if kind == "gzip" else zstandard.ZstdCompressor(level=3, write_checksum=True).compress
    frames = compress(data[:1000]) + compress(data[1000:])  # as `cat a.gz b.gz` or pzstd write them
    if kind == "gzip":
        frames += b"\0" * 100  # zero padding after the last member, which gzip readers accept
    path = touch(tmp_path / "x.jsonl.z", frames)
    with InputFile(path) as lines:
        assert list(lines) == LINES
        assert lines.compression == kind and lines.position == len(frames)


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress], ids=["gzip", "zstd"])
def test_truncated_compressed_data_is_an_unreadable_file(tmp_path, compress):
    data = compress(b"".join(LINES))
    path = touch(tmp_path / "cut.jsonl.x", data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match=f"^{path}: corrupt or truncated (gzip|zstd) data"):
        with InputFile(path) as lines:
            list(lines)


def write_parquet(path, table, row_group_size):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_parquet_rows_come_in_order_across_row_groups(tmp_path):
    texts = [f"row {i}" for i in range(2500)]
    path = write_parquet(tmp_path / "t.parquet", pa.table({"id": list(range(2500)), "content": texts}), 700)
    with ParquetRows(path, ["content"]) as rows:
        assert [r[0] for r in rows] == texts
        assert rows.position == rows.size


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"text": ["a"]}), r"no column 'content' \(columns: text\); name the text column with --json-keys"),
        (pa.table({"content": [1, 2]}), "column 'content' holds int64, not text"),
    ],
)
def test_parquet_without_a_text_column_is_an_unreadable_file(tmp_path, table, message):
    path = write_parquet(tmp_path / "t.parquet", table, 10)
    with pytest.raises(UnreadableFile, match=f"^{path}: {message}"):
        open_records(path, ["content"])


def test_truncated_parquet_is_an_unreadable_file(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", pa.table({"text": ["x" * 100] * 100}), 10)
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(UnreadableFile, match=f"^{path}: not a readable parquet file"):
        open_records(path, ["text"])


def test_batches_join_small_files_and_split_large_ones(tmp_path):
    small = [touch(tmp_path / f"s{i}.jsonl", b"".join(LINES[i * 3 : i * 3 + 3])) for i in range(4)]
    large = touch(tmp_path / "z_large.jsonl", b"".join(LINES))
    files = find_corpus_files([str(tmp_path)])
    assert [f.path for f in files] == small + [large]
    batches = list(batch_records(files, ["text"], max_records=100, max_bytes=1 << 30))
    first = batches[0]
    assert [(s.file_index, s.first_record, s.count, s.starts_file, s.ends_file) for s in first.segments] == [
        (0, 1, 3, True, True), (1, 1, 3, True, True), (2, 1, 3, True, True), (3, 1, 3, True, True),
        (4, 1, 88, True, False)]  # fmt: skip
    assert first.records == LINES[:12] + LINES[:88]
    later = [s for b in batches[1:] for s in b.segments]
    assert [s.first_record for s in later] == [89, 189, 289, 389, 489]
    assert [s.count for s in later] == [100, 100, 100, 100, 12] and later[-1].ends_file
    assert later[-1].position == files[-1].size
    assert b"".join(r for b in batches for r in b.records) == b"".join(LINES[:12]) + b"".join(LINES)


def test_a_file_that_breaks_midway_becomes_a_failed_segment(tmp_path):
    data = zstandard.ZstdCompressor().compress(b"".join(LINES))
    bad = touch(tmp_path / "a.jsonl.zst", data[: len(data) // 2])
    touch(tmp_path / "b.jsonl", LINES[0])
    segments = [s for b in batch_records(find_corpus_files([str(tmp_path)]), ["text"], 50, 1 << 30) for s in b.segments]
    failed = [s for s in segments if s.error]
    assert len(failed) == 1 and failed[0].file_index == 0 and failed[0].ends_file
    assert failed[0].error.startswith(f"{bad}: corrupt or truncated zstd data")
    assert (segments[-1].file_index, segments[-1].count, segments[-1].error) == (1, 1, None)


def test_per_input_names_follow_paths_below_the_common_directory(tmp_path):
    files = [CorpusFile(str(tmp_path / p), 1) for p in ["c1/x.jsonl.zst", "c2/x.jsonl.zst", "c2/y.parquet"]]
    assert per_input_names(files) == ["c1_x", "c2_x", "c2_y"]
    clash = [CorpusFile(str(tmp_path / "d/x.jsonl"), 1), CorpusFile(str(tmp_path / "d/x.jsonl.gz"), 1)]
    with pytest.raises(UserError, match="would both write outputs named 'x'"):
        per_input_names(clash)


def test_shards_are_contiguous_balanced_by_bytes_and_cover_every_file():
    sizes = [50, 1, 1, 1, 1, 30, 30, 30, 1, 1, 1, 100, 5, 5]
    files = [CorpusFile(f"f{i:02d}", size) for i, size in enumerate(sizes)]
    for count in (1, 2, 3, 5, len(files)):
        shards = [files_of_shard(files, ShardSpec(i, count)) for i in range(count)]
        assert [f for shard in shards for f in shard] == files and all(shards)
    three = [sum(f.size for f in files_of_shard(files, ShardSpec(i, 3))) for i in range(3)]
    assert three == [84, 63, 110]  # cuts at the first file reaching 1/3 and 2/3 of 257 bytes
    with pytest.raises(UserError, match="--num-shards 15 is more than the 14 input file"):
        files_of_shard(files, ShardSpec(0, 15))


def test_shard_comes_from_flags_or_from_a_slurm_array():
    assert shard_from_flags(None, None, {}) is None
    assert shard_from_flags(4, 1, {}) == ShardSpec(1, 4)
    array = {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10"}
    assert shard_from_flags(None, None, array) == ShardSpec(3, 8)
    assert shard_from_flags(None, 5, array) == ShardSpec(5, 8)
    assert ShardSpec(3, 8).prefix("out/slim") == "out/slim_shard00003of00008"
    with pytest.raises(UserError, match="--num-shards needs --shard-index"):
        shard_from_flags(4, None, {})
    stepped = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0"}  # --array=0-6:2
    with pytest.raises(UserError, match="shard index 6 is not in 0..3; with a SLURM array use a contiguous"):
        shard_from_flags(None, None, stepped)


def test_incomplete_or_mixed_shard_sets_are_refused():
    names = [f"out/c_shard{i:05d}of00003_text_document" for i in range(3)]
    check_complete_shard_sets(names + ["out/other_text_document"])
    with pytest.raises(UserError, match=r"out/c_shard\*_text_document: 1 of 3 shards missing \(00001\)"):
        check_complete_shard_sets([names[0], names[2]])
    with pytest.raises(UserError, match="shard 00002 of 00003 given twice"):
        check_complete_shard_sets(names + names[2:])
    with pytest.raises(UserError, match="shards of two shardings"):
        check_complete_shard_sets(names + ["out/c_shard00000of00002_text_document"])
