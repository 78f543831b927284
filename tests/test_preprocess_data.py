"""tools/preprocess_data.py: jsonl -> Megatron indexed datasets, with workers, bad lines and clean failure."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fixtures_text import TOOLS_DIR, call_quietly, load_tool, read_jsonl_texts, run_tool

from megagrow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megagrow.data.tokenizer import SentencePieceTokenizer

preprocess_data = load_tool("preprocess_data")


def preprocess(input_path, output_prefix, model, *flags):
    argv = ["--input", input_path, "--output-prefix", output_prefix, "--tokenizer-model", model, *flags]
    return call_quietly(preprocess_data.main, argv)


def files_under(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def mixed_jsonl(small_corpus, tmp_path_factory):
    """Real code and prose documents, an empty document, and bad lines at known line numbers."""
    texts = read_jsonl_texts(small_corpus / "code.jsonl")[:6] + read_jsonl_texts(small_corpus / "prose.jsonl")[:30]
    texts.insert(10, "")  # an empty document
    lines = [json.dumps({"text": t, "source": "x"}) for t in texts]
    bad = {
        3: "{truncated",
        7: json.dumps(["a", "list"]),
        11: json.dumps({"content": "wrong key"}),
        12: json.dumps({"text": 42}),
        20: "",
        25: '{"text": "\\ud800 lone surrogate"}',
    }
    for line_number in sorted(bad):  # ascending, so each lands on its final line number
        lines.insert(line_number - 1, bad[line_number])
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    good_texts = [json.loads(line)["text"] for number, line in enumerate(lines, start=1) if number not in bad]
    return path, good_texts, sorted(bad)


def test_documents_round_trip_with_eod(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, texts, _ = mixed_jsonl
    summary = preprocess(path, tmp_path / "out", tiny_tokenizer_model, "--append-eod", "--workers", 1)
    dataset = IndexedDataset(summary.outputs[0])
    tokenizer = SentencePieceTokenizer(tiny_tokenizer_model)
    assert dataset.dtype == np.uint16
    assert dataset.num_documents == summary.documents == len(texts)
    assert summary.tokens == dataset.num_tokens
    for d, text in enumerate(texts):
        tokens = dataset.document(d).tolist()
        if text:
            assert tokens[-1] == tokenizer.eod and tokenizer.decode(tokens[:-1]) == text
        else:  # as Megatron: an empty document gets no eod and is a document with no sequences
            assert tokens == []
    assert summary.empty_documents == 1
    assert len(dataset) == len(texts) - 1


def test_bad_lines_are_counted_with_line_numbers(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, _, bad_line_numbers = mixed_jsonl
    summary = preprocess(path, tmp_path / "out", tiny_tokenizer_model, "--workers", 2, "--chunk-size", 4)
    assert summary.bad_lines == len(bad_line_numbers)
    [report] = summary.problem_files
    assert report.path == str(path) and report.error is None
    assert [number for number, _ in report.bad_lines.first] == bad_line_numbers
    reasons = dict(report.bad_lines.first)
    assert reasons[3].startswith("invalid JSON") and reasons[7] == "not a JSON object (got list)"
    assert reasons[11] == "missing key 'text'" and reasons[12] == "value of 'text' is not a string (got int)"
    assert reasons[20] == "blank line" and "lone surrogate" in reasons[25]


def test_two_workers_write_the_same_bytes_as_one(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, _, _ = mixed_jsonl
    preprocess(path, tmp_path / "one", tiny_tokenizer_model, "--append-eod", "--workers", 1)
    preprocess(path, tmp_path / "two", tiny_tokenizer_model, "--append-eod", "--workers", 2, "--chunk-size", 3)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()


def test_gzip_input_gives_the_same_dataset(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, _, _ = mixed_jsonl
    compressed = tmp_path / "mixed.jsonl.gz"
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    plain = preprocess(path, tmp_path / "plain", tiny_tokenizer_model, "--workers", 1)
    from_gz = preprocess(compressed, tmp_path / "gz", tiny_tokenizer_model, "--workers", 1)
    assert (plain.documents, plain.tokens, plain.bad_lines) == (from_gz.documents, from_gz.tokens, from_gz.bad_lines)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"plain_text_document{suffix}").read_bytes() == (
            tmp_path / f"gz_text_document{suffix}"
        ).read_bytes()


def test_one_output_per_json_key_aligned_by_line(tmp_path, tiny_tokenizer_model):
    records = [
        {"title": "One", "body": "first body"},
        {"title": "Two", "body": ""},
        {"title": "Three"},
        {"title": "", "body": "last"},
    ]
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = preprocess(path, tmp_path / "out", tiny_tokenizer_model, "--json-keys", "title", "body", "--workers", 1)
    assert summary.bad_lines == 1 and summary.problem_files[0].bad_lines.first[0][0] == 3
    tokenizer = SentencePieceTokenizer(tiny_tokenizer_model)
    for key in ("title", "body"):
        dataset = IndexedDataset(tmp_path / f"out_{key}_document")
        kept = [r for r in records if "body" in r]
        assert [tokenizer.decode(dataset.document(d)) for d in range(dataset.num_documents)] == [r[key] for r in kept]


def test_summary_names_outputs_and_cli_prints_it(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, texts, _ = mixed_jsonl
    result = run_tool(
        "preprocess_data",
        "--input",
        path,
        "--output-prefix",
        tmp_path / "cli",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tiny_tokenizer_model,
        "--append-eod",
        "--workers",
        2,
        "--chunk-size",
        4,
        "--log-interval",
        10,
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(texts)} documents (1 empty)" in result.stdout
    progress_lines = [line for line in result.stderr.splitlines() if line.startswith("processed ")]
    assert len(progress_lines) == len(texts) // 10  # once per 10 documents, checked after each task
    assert "skipped 6 bad line(s)" in result.stderr
    assert files_under(tmp_path) == ["cli_text_document.bin", "cli_text_document.idx"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer is not supported"),
        (["--tokenizer-model", "missing.model"], "tokenizer model not found: missing.model"),
        (["--input", "missing.jsonl"], "input file not found: missing.jsonl"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(tmp_path, mixed_jsonl, tiny_tokenizer_model, flags, message):
    path, _, _ = mixed_jsonl
    argv = ["--input", path, "--output-prefix", tmp_path / "out", "--tokenizer-model", tiny_tokenizer_model, *flags]
    result = run_tool("preprocess_data", *argv)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert files_under(tmp_path) == []


def test_truncated_gzip_is_one_line_and_writes_nothing(tmp_path, mixed_jsonl, tiny_tokenizer_model):
    path, _, _ = mixed_jsonl
    data = gzip.compress(path.read_bytes())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    result = run_tool(
        "preprocess_data",
        "--input",
        truncated,
        "--output-prefix",
        out_dir / "out",
        "--tokenizer-model",
        tiny_tokenizer_model,
        "--workers",
        1,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {truncated}: corrupt or truncated gzip data")
    assert files_under(out_dir) == []


def test_failure_midway_leaves_no_output_and_no_temporaries(tmp_path, mixed_jsonl, tiny_tokenizer_model, monkeypatch):
    path, _, _ = mixed_jsonl
    calls = []
    original = IndexedDatasetBuilder.add_documents

    def failing_add_documents(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        original(self, tokens, lengths)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", failing_add_documents)
    with pytest.raises(OSError, match="disk full"):
        preprocess(path, tmp_path / "out", tiny_tokenizer_model, "--workers", 2, "--chunk-size", 2)
    assert files_under(tmp_path) == []


def open_fifo_for_writing(fifo, process, timeout=30.0):
    """Open a FIFO once `process` opens it for reading; fail (not hang) if it exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            os.set_blocking(fd, True)
            return open(fd, "w", encoding="utf-8")
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"preprocess_data.py never opened its input: {process.communicate()[1]}")
            time.sleep(0.01)


def test_interrupt_leaves_no_output_and_no_temporaries(tmp_path, tiny_tokenizer_model):
    # A pipe as input holds the run mid-way deterministically: it waits for more lines.
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # -X faulthandler: a run stuck after the interrupt prints every thread's stack on SIGABRT.
    argv = [sys.executable, "-X", "faulthandler", str(TOOLS_DIR / "preprocess_data.py"), "--input", str(fifo),
            "--output-prefix", str(out_dir / "out"), "--tokenizer-model", str(tiny_tokenizer_model),
            "--workers", "2", "--chunk-size", "2", "--log-interval", "1"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(90, process.kill)  # a stuck run fails the test instead of hanging it
    watchdog.start()
    try:
        with open_fifo_for_writing(fifo, process) as writer:
            # More lines than fit in flight (2 per task, 2 * workers + 2 tasks), so some are written.
            writer.writelines(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20))
            writer.flush()
            assert process.stderr.readline().startswith("processed ")  # the run is under way
            assert any(name.endswith(f".tmp-{process.pid}") for name in files_under(out_dir))
            process.send_signal(signal.SIGINT)
            try:
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGABRT)
                pytest.fail(f"still running 30 s after SIGINT; its threads: {process.communicate(timeout=30)[1][-4000:]}")
    finally:
        watchdog.cancel()
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "error: interrupted; outputs not yet complete were not kept"
    assert files_under(out_dir) == []
