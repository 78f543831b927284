"""tools/preprocess_data.py on corpora as they are published: every format, many files, shards, resumption, bad files."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from fixtures_text import REPO_ROOT, TOOLS_DIR, call_quietly, load_tool, read_jsonl_texts, run_tool

from megagrow.data.blended_dataset import parse_data_path
from megagrow.data.indexed_dataset import IndexedDataset

preprocess_data = load_tool("preprocess_data")
merge_datasets = load_tool("merge_datasets")
PARTS = 4


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


WRITERS = {
    "jsonl": lambda path, texts: path.with_name(path.name + ".jsonl").write_bytes(jsonl_bytes(texts)),
    "gz": lambda path, texts: path.with_name(path.name + ".jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(texts))),
    "zst": lambda path, texts: path.with_name(path.name + ".jsonl.zst").write_bytes(
        zstandard.ZstdCompressor(level=3).compress(jsonl_bytes(texts))),
    "parquet": lambda path, texts: pq.write_table(
        pa.table({"id": list(range(len(texts))), "text": texts}), path.with_name(path.name + ".parquet"),
        row_group_size=4),
}


@pytest.fixture(scope="module")
def corpus(small_corpus, tmp_path_factory):
    """The same real documents as one reference jsonl, and split in 4 parts as each format and as a mix of all."""
    texts = read_jsonl_texts(small_corpus / "code.jsonl")[:12] + read_jsonl_texts(small_corpus / "prose.jsonl")[:40]
    texts.insert(5, "")  # an empty document
    root = tmp_path_factory.mktemp("formats")
    (root / "all.jsonl").write_bytes(jsonl_bytes(texts))
    bounds = [0, 9, 10, 31, len(texts)]  # uneven, one part of a single document
    parts = [texts[bounds[i] : bounds[i + 1]] for i in range(PARTS)]
    for variant in (*WRITERS, "mixed"):
        (root / variant).mkdir()
        for i, part in enumerate(parts):
            kind = list(WRITERS)[i] if variant == "mixed" else variant
            WRITERS[kind](root / variant / f"part{i}", part)
    return root, texts, parts


def run(inputs, prefix, model, *flags):
    argv = ["--input", *map(str, inputs), "--output-prefix", prefix, "--tokenizer-model", model, "--append-eod",
            "--workers", 1, "--chunk-size", 5, *flags]
    return call_quietly(preprocess_data.main, argv)


def dataset_bytes(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.fixture(scope="module")
def reference(corpus, tiny_tokenizer_model, tmp_path_factory):
    """The datasets of one run over the single reference jsonl."""
    root, texts, _ = corpus
    prefix = tmp_path_factory.mktemp("reference") / "all"
    summary = run([root / "all.jsonl"], prefix, tiny_tokenizer_model)
    assert summary.documents == len(texts) and summary.empty_documents == 1
    return dataset_bytes(f"{prefix}_text_document")


@pytest.mark.parametrize("variant", [*WRITERS, "mixed"])
@pytest.mark.parametrize("style", ["directory", "glob", "files"])
def test_every_format_and_input_style_writes_the_same_bytes(corpus, reference, tiny_tokenizer_model, tmp_path,
                                                             variant, style):
    root, _, _ = corpus
    directory = root / variant
    inputs = {"directory": [directory], "glob": [directory / "part*"],
              "files": sorted(directory.iterdir(), reverse=True)}[style]  # given out of order: still sorted
    summary = run(inputs, tmp_path / "out", tiny_tokenizer_model)
    assert summary.files == PARTS and summary.bad_lines == 0
    assert dataset_bytes(tmp_path / "out_text_document") == reference


def test_three_shards_merged_equal_one_run(corpus, reference, tiny_tokenizer_model, tmp_path):
    root, _, _ = corpus
    for index in range(3):
        summary = run([root / "mixed"], tmp_path / "c", tiny_tokenizer_model, "--num-shards", 3, "--shard-index", index)
        assert summary.outputs == [f"{tmp_path}/c_shard{index:05d}of00003_text_document"]
        manifest = json.loads((tmp_path / f"c_shard{index:05d}of00003_manifest.json").read_text())
        assert manifest["documents"] == summary.documents and manifest["outputs"] == summary.outputs
    merged = call_quietly(merge_datasets.main, ["--input", f"{tmp_path}/c_shard*_text_document",
                                                "--output-prefix", tmp_path / "merged"])
    assert dataset_bytes(tmp_path / "merged") == reference
    assert merged.num_documents == sum(json.loads(p.read_text())["documents"] for p in tmp_path.glob("*manifest.json"))
    # The other way to train on shards: a mix weighting each by its tokens.
    shards = [IndexedDataset(tmp_path / f"c_shard{i:05d}of00003_text_document") for i in range(3)]
    call_quietly(merge_datasets.main, ["--input", f"{tmp_path}/c_shard*_text_document", "--write-mix", tmp_path / "c.mix",
                                       "--mix-weight", "0.7"])
    blend = parse_data_path([f"@{tmp_path / 'c.mix'}"])
    assert [c.prefix for c in blend] == [str(tmp_path / f"c_shard{i:05d}of00003_text_document") for i in range(3)]
    tokens = np.array([s.num_tokens for s in shards])
    np.testing.assert_allclose([c.weight for c in blend], tokens / tokens.sum(), atol=1e-5)


def test_merge_refuses_an_incomplete_set_of_shards(corpus, tiny_tokenizer_model, tmp_path):
    root, _, _ = corpus
    for index in (0, 2):
        run([root / "mixed"], tmp_path / "c", tiny_tokenizer_model, "--num-shards", 3, "--shard-index", index)
    result = run_tool("merge_datasets", "--input", f"{tmp_path}/c_shard*_text_document", "--output-prefix", tmp_path / "m")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "1 of 3 shards missing (00001); rerun the preprocessing array" in result.stderr
    assert not list(tmp_path.glob("m*"))


def test_slurm_array_variables_choose_the_shard(corpus, tiny_tokenizer_model, tmp_path):
    root, _, _ = corpus
    env = dict(os.environ, SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="4")
    result = run_tool("preprocess_data", "--input", root / "mixed", "--output-prefix", tmp_path / "s",
                      "--tokenizer-model", tiny_tokenizer_model, "--workers", 1, "--log-interval", 2, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("shard00001of00003: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s_shard00001of00003_manifest.json", "s_shard00001of00003_text_document.bin",
        "s_shard00001of00003_text_document.idx"]
    progress = [line for line in result.stderr.splitlines() if line.startswith("processed ")]
    assert progress and all("/2, " in line and "ETA " in line and "tokens/s" in line for line in progress)
    assert "100.0% of input, ETA 0:00:00" in progress[-1]


def open_fifo_writer(fifo, process, timeout=60.0) -> int:
    """A descriptor writing to `fifo` once `process` opens it to read; fails (not hangs) if it exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            os.set_blocking(fd, True)
            return fd
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"preprocess_data.py never opened its input: {process.communicate()[1]}")
            time.sleep(0.01)


def feed_and_kill(argv, fifo, lines, out_dir):
    """Start a run reading `fifo`, give it `lines` and kill -9 its whole process group once it is writing."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(60, os.killpg, (process.pid, signal.SIGKILL))  # a stuck run fails, not hangs, the test
    watchdog.start()
    fd = None
    try:
        fd = open_fifo_writer(fifo, process)
        os.write(fd, b"".join(lines))  # the fifo stays open: the run waits for more
        assert process.stderr.readline().startswith("processed ")
        assert any(".tmp-" in p.name for p in out_dir.iterdir())
    finally:
        watchdog.cancel()
        os.killpg(process.pid, signal.SIGKILL)  # the node dies: main process and workers at once
        process.wait()
        if fd is not None:
            os.close(fd)


def test_a_killed_shard_is_redone_alone_on_rerun(corpus, reference, tiny_tokenizer_model, tmp_path):
    root, _, parts = corpus
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_bytes(jsonl_bytes(parts[0]))
    os.mkfifo(inputs / "b.jsonl")  # shard 1's only file: holds that run mid-way while the test kills it
    (inputs / "c.jsonl").write_bytes(jsonl_bytes(parts[3]))
    # More lines than fit in flight (1 per task, 2 * workers + 2 tasks), so some are written.
    b_lines = jsonl_bytes(parts[1] + parts[2]).splitlines(keepends=True)
    out = tmp_path / "out"
    out.mkdir()
    files = [inputs / "a.jsonl", inputs / "b.jsonl", inputs / "c.jsonl"]

    def argv(index):
        return [sys.executable, str(TOOLS_DIR / "preprocess_data.py"), "--input", *map(str, files),
                "--output-prefix", str(out / "k"), "--tokenizer-model", str(tiny_tokenizer_model), "--append-eod",
                "--workers", "1", "--chunk-size", "1", "--log-interval", "1", "--num-shards", "3",
                "--shard-index", str(index)]

    for index in (0, 2):
        assert subprocess.run(argv(index), capture_output=True).returncode == 0
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    feed_and_kill(argv(1), inputs / "b.jsonl", b_lines, out)
    assert not (out / "k_shard00001of00003_manifest.json").exists()
    assert not (out / "k_shard00001of00003_text_document.idx").exists()

    # Rerun the whole array: shards 0 and 2 are skipped untouched, shard 1 is redone.
    for index in (0, 2):
        result = subprocess.run(argv(index), capture_output=True, text=True)
        assert result.returncode == 0 and "already complete" in result.stderr and result.stdout == ""
    rerun = subprocess.Popen(argv(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = open_fifo_writer(inputs / "b.jsonl", rerun)
    os.write(fd, b"".join(b_lines))
    os.close(fd)
    _, stderr = rerun.communicate(timeout=120)  # communicate(), not wait(): the pipes must be drained
    assert rerun.returncode == 0, stderr
    assert "left by an interrupted run" in stderr  # its temporaries went; a killed run's can be as big as the output
    assert all(out.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    assert not any(".tmp-" in p.name for p in out.iterdir())
    call_quietly(merge_datasets.main, ["--input", f"{out}/k_shard*_text_document", "--output-prefix", tmp_path / "m"])
    assert dataset_bytes(tmp_path / "m") == reference


def truncated_zst(path, texts):
    data = zstandard.ZstdCompressor().compress(jsonl_bytes(texts))
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def parquet_without_text(path, texts):
    pq.write_table(pa.table({"content": texts}), path)
    return path


@pytest.mark.parametrize("make_bad, message", [
    (lambda d, texts: truncated_zst(d / "part1.jsonl.zst", texts), "corrupt or truncated zstd data"),
    (lambda d, texts: parquet_without_text(d / "part1.parquet", texts), "no column 'text' (columns: content)"),
])  # fmt: skip
def test_an_unreadable_file_stops_the_run_in_one_line_or_is_left_out_whole(corpus, tiny_tokenizer_model, tmp_path,
                                                                           make_bad, message):
    root, texts, parts = corpus
    good = tmp_path / "good"
    good.mkdir()
    WRITERS["jsonl"](good / "part0", parts[0])
    WRITERS["zst"](good / "part2", parts[2] + parts[3])
    run([good], tmp_path / "without", tiny_tokenizer_model)
    bad = make_bad(good, texts)  # sorts between the good files, after documents were written

    out = tmp_path / "out"
    common = ["--input", good, "--output-prefix", out / "x", "--tokenizer-model", tiny_tokenizer_model,
              "--append-eod", "--workers", 1, "--chunk-size", 5]
    result = run_tool("preprocess_data", *common)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad}: {message}") and line.endswith("(or pass --skip-bad-files to leave unreadable files out)")
    assert not out.exists() or not list(out.iterdir())

    result = run_tool("preprocess_data", *common, "--skip-bad-files")
    assert result.returncode == 0, result.stderr
    assert f"left out: {bad}: {message}" in result.stderr and "1 unreadable files left out" in result.stdout
    assert dataset_bytes(out / "x_text_document") == dataset_bytes(tmp_path / "without_text_document")


@pytest.mark.parametrize("content", [b"", b'{"title": "no text key"}\n\n'], ids=["empty", "all-bad"])
def test_an_input_without_documents_is_an_error_unless_allowed(tmp_path, tiny_tokenizer_model, content):
    (tmp_path / "empty.jsonl").write_bytes(content)
    common = ["--input", tmp_path / "empty.jsonl", "--output-prefix", tmp_path / "out" / "e",
              "--tokenizer-model", tiny_tokenizer_model, "--workers", 1]
    result = run_tool("preprocess_data", *common)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no documents in 1 input file(s)")
    assert "--allow-empty" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    result = run_tool("preprocess_data", *common, "--allow-empty")
    assert result.returncode == 0, result.stderr
    assert IndexedDataset(tmp_path / "out" / "e_text_document").num_documents == 0


def test_output_per_input_writes_one_dataset_per_file(corpus, reference, tiny_tokenizer_model, tmp_path):
    root, _, parts = corpus
    summary = run([root / "mixed"], tmp_path / "p", tiny_tokenizer_model, "--output-per-input")
    names = ["part0", "part1", "part2", "part3"]
    assert summary.outputs == [f"{tmp_path}/p_{name}_text_document" for name in names]
    assert [IndexedDataset(p).num_documents for p in summary.outputs] == [len(p) for p in parts]
    call_quietly(merge_datasets.main, ["--input", *summary.outputs, "--output-prefix", tmp_path / "m"])
    assert dataset_bytes(tmp_path / "m") == reference


def test_null_parquet_values_are_bad_rows(tmp_path, tiny_tokenizer_model):
    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "n.parquet")
    summary = run([tmp_path / "n.parquet"], tmp_path / "n", tiny_tokenizer_model)
    [report] = summary.problem_files
    assert summary.documents == 2 and report.bad_lines.first == [(2, "value of 'text' is not a string (got null)")]
    assert report.bad_lines.report(report.path).splitlines()[1] == "  row 2: value of 'text' is not a string (got null)"


def test_slurm_example_scripts_preprocess_merge_and_mix(corpus, tiny_tokenizer_model, tmp_path):
    root, _, _ = corpus
    here = REPO_ROOT / "examples" / "preprocess_slurm"
    base = dict(os.environ, PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(REPO_ROOT), TOKENIZER=str(tiny_tokenizer_model),
                SLURM_CPUS_PER_TASK="1")
    corpora = {"web": root / "mixed", "code": root / "parquet"}
    for name, directory in corpora.items():
        for task in range(2):
            env = dict(base, INPUT=f"{directory}/part*", OUT=str(tmp_path / name), JSON_KEY="text",
                       SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2")
            result = subprocess.run(["bash", str(here / "preprocess_array.sbatch")], env=env, capture_output=True,
                                    text=True)
            assert result.returncode == 0, result.stderr
    corpora_flag = f"0.7:{tmp_path / 'web'}:text 0.3:{tmp_path / 'code'}:text"
    for mode in ("merge", "mix"):
        env = dict(base, CORPORA=corpora_flag, MIX=str(tmp_path / f"{mode}.mix"), MODE=mode)
        result = subprocess.run(["bash", str(here / "merge.sbatch")], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    merged = parse_data_path([f"@{tmp_path / 'merge.mix'}"])
    assert [(c.weight, c.prefix) for c in merged] == [
        (0.7, f"{tmp_path}/web_text_document"), (0.3, f"{tmp_path}/code_text_document")]
    mixed = parse_data_path([f"@{tmp_path / 'mix.mix'}"])
    assert len(mixed) == 4 and all("_shard0000" in c.prefix for c in mixed)
    assert sum(c.weight for c in mixed[:2]) == pytest.approx(0.7, abs=1e-5)
    tokens = [IndexedDataset(c.prefix).num_tokens for c in mixed[:2]]
    assert mixed[0].weight / mixed[1].weight == pytest.approx(tokens[0] / tokens[1], rel=1e-4)


def test_bad_lines_are_reported_per_file_the_first_files_in_detail(tmp_path, tiny_tokenizer_model, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(23):
        (inputs / f"f{i:02d}.jsonl").write_bytes(b'{"text": "fine"}\n{"text": truncated\n')
    summary = run([inputs], tmp_path / "o", tiny_tokenizer_model)
    err = capsys.readouterr().err
    assert summary.documents == 23 and summary.bad_lines == 23 and len(summary.problem_files) == 23
    assert f"{inputs}/f00.jsonl: skipped 1 bad line(s); first 1:\n  line 2: invalid JSON" in err
    assert err.count("skipped 1 bad line(s)") == 20 and "... and 3 more files with 3 bad lines" in err
    assert summary.problem_files[-1].bad_lines.first == []  # past the detailed files, only counts are kept
