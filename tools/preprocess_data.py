"""Tokenize a jsonl corpus (plain or .gz) into Megatron indexed datasets.

Writes `{output_prefix}_{key}_document.bin/.idx` for every --json-keys key; flags follow
Megatron-LM's tools/preprocess_data.py. Each good line is one document in every output,
so the outputs of several keys stay aligned line by line.

    python tools/preprocess_data.py --input data/corpus/code.jsonl --output-prefix data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer.model \\
        --append-eod --workers 2

Worker processes parse and tokenize batches of raw lines; the main process only reads
bytes and writes tokens, so throughput scales with --workers. Bad lines (invalid JSON,
not an object, missing key, non-string value) are skipped and reported with their line
numbers. Outputs appear under their final names only when complete; an interrupted or
failed run leaves an existing older output untouched and no new one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megagrow.data.indexed_dataset import (
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    open_builder,
    token_dtype_for_vocab,
)
from megagrow.data.jsonl import BadLine, BadLineLog, InputFile, document_fields
from megagrow.data.tokenizer import TOKENIZER_TYPE, TOKENIZER_TYPES, SentencePieceTokenizer, build_tokenizer
from megagrow.errors import exit_on_user_error

# A task also ends at this much input, so files of long documents (source files of tens
# of KB) still split into enough tasks to keep every worker busy to the end.
CHUNK_BYTES = 1 << 17


# ------------------------------------------------------------------------------ workers


@dataclass
class EncodedChunk:
    """Tokens of one batch of lines: per json key, all documents back to back plus their lengths."""

    lines: int
    bytes: int
    bad_lines: list[tuple[int, str]]
    tokens: list[np.ndarray]
    lengths: list[np.ndarray]


class ChunkEncoder:
    """Parses and tokenizes batches of raw jsonl lines; one lives in each worker process."""

    def __init__(self, tokenizer: SentencePieceTokenizer, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.eod = tokenizer.eod if append_eod else None
        self.dtype = np.dtype(dtype)

    def __call__(self, chunk: tuple[int, list[bytes]]) -> EncodedChunk:
        first_line_number, lines = chunk
        documents: list[list[list[int]]] = [[] for _ in self.json_keys]
        bad_lines = []
        for line_number, line in enumerate(lines, start=first_line_number):
            try:
                texts = document_fields(line, self.json_keys)
            except BadLine as err:
                bad_lines.append((line_number, str(err)))
                continue
            for key_documents, text in zip(documents, texts):
                ids = self.tokenizer.encode(text)
                # As Megatron: an empty document gets no eod; it stays a document without tokens.
                if ids and self.eod is not None:
                    ids.append(self.eod)
                key_documents.append(ids)
        return EncodedChunk(
            lines=len(lines),
            bytes=sum(map(len, lines)),
            bad_lines=bad_lines,
            tokens=[np.fromiter(itertools.chain.from_iterable(d), self.dtype, sum(map(len, d))) for d in documents],
            lengths=[np.fromiter(map(len, d), np.int64, len(d)) for d in documents],
        )


_worker_encoder: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder) -> None:
    """Pool initializer: keep the encoder (the tokenizer loads once per worker here)."""
    global _worker_encoder
    # Ctrl-C and termination are the main process's to handle: it stops the pool and
    # removes partial outputs; workers printing their own tracebacks would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = encoder


def _encode_in_worker(chunk: tuple[int, list[bytes]]) -> EncodedChunk:
    """Pool task: encode one chunk with this worker's encoder."""
    return _worker_encoder(chunk)


def start_workers(workers: int, encoder: ChunkEncoder) -> multiprocessing.pool.Pool:
    """A pool of `workers` processes holding `encoder`, forked with SIGTERM's default action.

    A worker forked with a Python-level SIGTERM handler can lose the SIGTERM of a
    terminate() that follows its start at once (CPython clears signals pending at fork);
    the pool's exit would then wait for it forever.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL) if in_main_thread else None
    try:
        return multiprocessing.Pool(workers, initializer=_init_worker, initargs=(encoder,))
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- main side


def read_chunks(lines: Iterable[bytes], max_lines: int, max_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """Group raw lines into (first line number, lines) tasks of at most max_lines lines / about max_bytes."""
    batch: list[bytes] = []
    batch_bytes, first_line_number = 0, 1
    for line_number, line in enumerate(lines, start=1):
        batch.append(line)
        batch_bytes += len(line)
        if len(batch) >= max_lines or batch_bytes >= max_bytes:
            yield first_line_number, batch
            batch, batch_bytes, first_line_number = [], 0, line_number + 1
    if batch:
        yield first_line_number, batch


def ordered_map(pool: multiprocessing.pool.Pool, func: Callable, tasks: Iterable, max_in_flight: int) -> Iterator:
    """`func(task)` for every task, run by the pool, yielded in task order with at most `max_in_flight` queued.

    Pool.imap would read the whole input ahead into memory; this keeps reading in step
    with writing, and hands over each result as soon as those before it are done.
    """
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(func, (task,)))
        while len(pending) >= max_in_flight or (pending and pending[0].ready()):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextlib.contextmanager
def sigterm_raises_system_exit():
    """Turn SIGTERM (e.g. a cancelled cluster job) into SystemExit so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a replacement pool worker, forked before its initializer reset this
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@dataclass
class PreprocessSummary:
    """What a run read and wrote."""

    input: str
    outputs: dict[str, str]
    workers: int
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    bad_lines: int = 0
    first_bad_lines: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens written per second of wall time, start-up included."""
        return self.tokens / self.seconds if self.seconds else 0.0


class ProgressReport:
    """A progress bar over the input bytes (on terminals) plus a log line every `log_interval` documents."""

    def __init__(self, input_file: InputFile, log_interval: int, summary: PreprocessSummary, start: float):
        self.input_file = input_file
        self.log_interval = log_interval
        self.summary = summary
        self.start = start
        self.bar = tqdm(
            total=input_file.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="tokenizing",
            file=sys.stderr,
            disable=None,
        )
        self.next_log = log_interval

    def update(self) -> None:
        """Advance the bar to the input position; log when another interval of documents is done."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        s = self.summary
        position = self.input_file.position
        self.bar.update((position if position is not None else s.input_bytes) - self.bar.n)
        self.bar.set_postfix_str(
            f"{s.documents / elapsed:,.0f} docs/s, {s.tokens / elapsed:,.0f} tokens/s", refresh=False
        )
        if s.documents >= self.next_log:
            self.next_log = (s.documents // self.log_interval + 1) * self.log_interval
            # Line and newline in one write: an interrupt between two writes would glue
            # the next message (the one-line error) onto this one.
            self.bar.write(
                f"processed {s.documents:,} documents ({s.documents / elapsed:,.0f} docs/s, "
                f"{s.tokens / elapsed:,.0f} tokens/s, {s.input_bytes / elapsed / 2**20:.2f} MiB/s)\n",
                file=sys.stderr, end="",
            )

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def write_chunk(builders: list[IndexedDatasetBuilder], encoded: EncodedChunk) -> tuple[int, int]:
    """Append a chunk's documents to every key's builder; returns (tokens, empty documents)."""
    tokens = empty = 0
    for builder, flat, lengths in zip(builders, encoded.tokens, encoded.lengths):
        ends = np.cumsum(lengths)
        for start, end in zip(itertools.chain((0,), ends.tolist()), ends.tolist()):
            if end > start:
                builder.add_item(flat[start:end])
            else:
                empty += 1  # As Megatron: a document with no sequences keeps the key outputs aligned.
            builder.end_document()
        tokens += flat.size
    return tokens, empty


def preprocess(args: argparse.Namespace) -> PreprocessSummary:
    """Tokenize args.input into one indexed dataset per json key."""
    start = time.perf_counter()
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    encoder = ChunkEncoder(tokenizer, args.json_keys, args.append_eod, token_dtype_for_vocab(tokenizer.vocab_size))
    outputs = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    summary = PreprocessSummary(input=args.input, outputs=outputs, workers=args.workers)
    bad_lines = BadLineLog()
    with contextlib.ExitStack() as stack:
        input_file = stack.enter_context(InputFile(args.input))
        # Builders are entered before the pool so they exit after it: on any error the
        # workers stop first, then each builder deletes its temporary files.
        builders = [stack.enter_context(open_builder(prefix, encoder.dtype)) for prefix in outputs.values()]
        pool = stack.enter_context(start_workers(args.workers, encoder))
        stack.enter_context(sigterm_raises_system_exit())
        progress = ProgressReport(input_file, args.log_interval, summary, start)
        stack.callback(progress.close)
        chunks = read_chunks(input_file, args.chunk_size, CHUNK_BYTES)
        for encoded in ordered_map(pool, _encode_in_worker, chunks, max_in_flight=2 * args.workers + 2):
            tokens, empty = write_chunk(builders, encoded)
            bad_lines.extend(encoded.bad_lines)
            summary.input_bytes += encoded.bytes
            summary.documents += encoded.lines - len(encoded.bad_lines)
            summary.tokens += tokens
            summary.empty_documents += empty
            progress.update()
    summary.bad_lines, summary.first_bad_lines = bad_lines.count, bad_lines.first
    summary.seconds = time.perf_counter() - start
    if bad_lines.count:
        print(bad_lines.report(args.input), file=sys.stderr)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (Megatron's names)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", required=True, help="jsonl file, plain or gzip-compressed (a pipe such as /dev/stdin works)"
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys whose text is tokenized; one output per key"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=TOKENIZER_TYPE, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    group.add_argument("--tokenizer-model", help="SentencePiece .model file (tools/train_tokenizer.py writes one), "
                                                 "or for HuggingFaceTokenizer a directory holding tokenizer.json")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: its ids are 0..N-1 and N is eod")
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id (eos) to every non-empty document"
    )
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: CPU count)"
    )
    group.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        help=f"lines per worker task (a task also ends at {CHUNK_BYTES // 1024} KiB)",
    )
    group.add_argument("--log-interval", type=int, default=10000, help="log a progress line every this many documents")
    args = parser.parse_args(argv)
    for flag in ("workers", "chunk_size", "log_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> PreprocessSummary:
    """Run preprocessing from command-line flags and print a summary."""
    args = parse_args(argv)
    summary = preprocess(args)
    print(
        f"{summary.documents:,} documents ({summary.empty_documents:,} empty), {summary.tokens:,} tokens, "
        f"{summary.bad_lines:,} bad lines skipped, from {summary.input_bytes / 2**20:.1f} MiB of jsonl "
        f"in {summary.seconds:.2f}s ({summary.tokens_per_second:,.0f} tokens/s, {summary.workers} worker(s))"
    )
    for key, prefix in summary.outputs.items():
        print(f"  {key}: {data_file_path(prefix)} {index_file_path(prefix)}")
    return summary


if __name__ == "__main__":
    main()
