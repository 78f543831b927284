"""Tokenize a text corpus (jsonl, jsonl.gz, jsonl.zst or parquet files) into Megatron indexed datasets.

Writes `{output_prefix}_{key}_document.bin/.idx` for every --json-keys key; flags follow
Megatron-LM's tools/preprocess_data.py. Each good record is one document in every
output, so the outputs of several keys stay aligned record by record.

    python tools/preprocess_data.py --input data/corpus/code.jsonl --output-prefix data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer.model \\
        --append-eod --workers 2
    python tools/preprocess_data.py --input 'SlimPajama/train/chunk*/*.jsonl.zst' --output-prefix data/slim \\
        --tokenizer-model data/tokenizer.model --append-eod
    python tools/preprocess_data.py --input starcoderdata/python starcoderdata/rust --json-keys content \\
        --output-prefix data/code --tokenizer-model data/tokenizer.model --append-eod

--input takes files, directories (every corpus file below them) and glob patterns, as
many as needed; documents are taken in sorted path order, then line (or row) order, so
a rerun writes the same bytes. jsonl files may be plain, gzip or zstd (recognised by
their content); in parquet files --json-keys names the text columns. One dataset per key
holds every input, or one per input file with --output-per-input.

Many nodes: --num-shards K --shard-index I (by default SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID) takes shard I's 1/K of the input files and writes
`{output_prefix}_shard{I:05d}of{K:05d}_{key}_document`; a shard whose manifest shows it
complete is skipped, so a rerun of the array redoes only what is missing, and
tools/merge_datasets.py joins the shards. See examples/preprocess_slurm/.

Worker processes parse and tokenize batches of records (a batch may span several small
files, a large file spans many batches); the main process only reads and writes. Bad
records (invalid JSON, not an object, missing key, non-string value) are skipped and
reported per file with their line numbers. A file that cannot be read to its end
(truncated gzip/zstd, parquet without the column) stops the run, or with
--skip-bad-files is left out entirely and reported. An input that yields no documents is
an error unless --allow-empty. Outputs appear under their final names only when
complete; an interrupted or failed run leaves an existing older output untouched.
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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from megagrow.data.corpus_inputs import CorpusFile, Record, RecordBatch, batch_records, find_corpus_files, per_input_names
from megagrow.data.corpus_shards import (
    ShardManifest,
    ShardSpec,
    files_of_shard,
    manifest_inputs,
    manifest_path,
    shard_from_flags,
    why_not_complete,
    write_manifest,
)
from megagrow.data.corpus_writer import BatchWriter, EncodedChunk, OutputDatasets, PreprocessSummary, ProgressReport
from megagrow.data.indexed_dataset import data_file_path, index_file_path, stale_temporaries, token_dtype_for_vocab
from megagrow.data.jsonl import BadLine, column_fields, document_fields
from megagrow.data.tokenizer import TOKENIZER_TYPE, TOKENIZER_TYPES, SentencePieceTokenizer, build_tokenizer
from megagrow.errors import exit_on_user_error

# A task also ends at this much input, so files of long documents (source files of tens
# of KB) still split into enough tasks to keep every worker busy to the end.
CHUNK_BYTES = 1 << 17


# ------------------------------------------------------------------------------ workers


class ChunkEncoder:
    """Parses and tokenizes batches of records (jsonl lines or parquet rows); one lives in each worker process."""

    def __init__(self, tokenizer: SentencePieceTokenizer, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.eod = tokenizer.eod if append_eod else None
        self.dtype = np.dtype(dtype)

    def __call__(self, records: list[Record]) -> EncodedChunk:
        documents: list[list[list[int]]] = [[] for _ in self.json_keys]
        bad_records = []
        for index, record in enumerate(records):
            try:
                if isinstance(record, bytes):
                    texts = document_fields(record, self.json_keys)
                else:
                    texts = column_fields(record, self.json_keys)
            except BadLine as err:
                bad_records.append((index, str(err)))
                continue
            for key_documents, text in zip(documents, texts):
                ids = self.tokenizer.encode(text)
                # As Megatron: an empty document gets no eod; it stays a document without tokens.
                if ids and self.eod is not None:
                    ids.append(self.eod)
                key_documents.append(ids)
        return EncodedChunk(
            bad_records=bad_records,
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


def _encode_in_worker(records: list[Record]) -> EncodedChunk:
    """Pool task: encode one batch with this worker's encoder."""
    return _worker_encoder(records)


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


def ordered_map(pool: multiprocessing.pool.Pool, func: Callable, batches: Iterable[RecordBatch],
                max_in_flight: int) -> Iterator[tuple[RecordBatch, EncodedChunk | None]]:
    """(batch, func(batch.records)) for every batch, run by the pool, in batch order with at most `max_in_flight` queued.

    Pool.imap would read the whole input ahead into memory; this keeps reading in step
    with writing, and hands over each result as soon as those before it are done.
    A batch without records (an empty file's bookkeeping) skips the pool and gets None.
    """
    pending: deque = deque()

    def next_result():
        batch, result = pending.popleft()
        return batch, (result.get() if result is not None else None)

    for batch in batches:
        pending.append((batch, pool.apply_async(func, (batch.records,)) if batch.records else None))
        while len(pending) >= max_in_flight or (pending and (pending[0][1] is None or pending[0][1].ready())):
            yield next_result()
    while pending:
        yield next_result()


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
class RunPlan:
    """What this process reads and writes: its files, its output names, and the shard it is."""

    files: list[CorpusFile]
    shard: ShardSpec | None
    output_prefix: str  # of the combined datasets (the shard's when sharded)
    per_input_prefixes: list[str] | None  # one per file with --output-per-input
    dataset_prefixes: list[str]  # every dataset this run writes
    settings: dict  # what shapes the output, as the shard manifest records it


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Find the input files, take this shard's share of them, and name the outputs."""
    files = find_corpus_files(args.input)
    names = per_input_names(files) if args.output_per_input else None  # named over all files: shard-independent
    shard = shard_from_flags(args.num_shards, args.shard_index)
    if shard is not None:
        mine = files_of_shard(files, shard)
        if names is not None:
            first = files.index(mine[0])
            names = names[first : first + len(mine)]
        files = mine
    output_prefix = shard.prefix(args.output_prefix) if shard else args.output_prefix
    per_input = [f"{args.output_prefix}_{name}" for name in names] if names is not None else None
    keys = args.json_keys
    datasets = [f"{p}_{key}_document" for p in (per_input if per_input is not None else [output_prefix]) for key in keys]
    settings = {"json_keys": list(keys), "tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                "vocab_size": args.vocab_size, "append_eod": args.append_eod, "output_per_input": args.output_per_input}
    return RunPlan(files, shard, output_prefix, per_input, datasets, settings)


def preprocess(args: argparse.Namespace) -> PreprocessSummary:
    """Tokenize args.input into one indexed dataset per json key (per input file with --output-per-input)."""
    start = time.perf_counter()
    plan = plan_run(args)
    summary = PreprocessSummary(files=len(plan.files), outputs=[], workers=args.workers, shard=plan.shard)
    if plan.shard is not None:
        manifest = manifest_path(plan.output_prefix)
        reason = why_not_complete(manifest, plan.files, plan.settings, args.skip_bad_files)
        if reason is None:
            print(f"{plan.shard.tag}: already complete ({manifest}); skipping it", file=sys.stderr)
            summary.already_complete, summary.outputs = True, plan.dataset_prefixes
            return summary
        if reason != "no manifest":
            print(f"{plan.shard.tag}: redoing it: {reason}", file=sys.stderr)
        # A rerun after a killed run: its temporaries may be as large as the output.
        for path in stale_temporaries(plan.dataset_prefixes):
            os.remove(path)
            print(f"removed {path}, left by an interrupted run", file=sys.stderr)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    encoder = ChunkEncoder(tokenizer, args.json_keys, args.append_eod, token_dtype_for_vocab(tokenizer.vocab_size))
    outputs = OutputDatasets(args.json_keys, encoder.dtype, args.allow_empty)
    with contextlib.ExitStack() as stack:
        # The outputs are entered before the pool so they exit after it: on any error the
        # workers stop first, then the unpublished datasets delete their temporary files.
        stack.callback(outputs.abort)
        if plan.per_input_prefixes is None:
            outputs.open(plan.output_prefix)
        pool = stack.enter_context(start_workers(args.workers, encoder))
        stack.enter_context(sigterm_raises_system_exit())
        progress = ProgressReport(plan.files, args.log_interval, summary, start)
        stack.callback(progress.close)
        writer = BatchWriter(plan.files, outputs, plan.per_input_prefixes, args.skip_bad_files, summary, progress)
        batches = batch_records(plan.files, args.json_keys, args.chunk_size, CHUNK_BYTES)
        for batch, encoded in ordered_map(pool, _encode_in_worker, batches, max_in_flight=2 * args.workers + 2):
            writer.write(batch, encoded)
        pool.close()  # the workers exit before the index is written: their memory and its buffers never add up
        pool.join()
        summary.print_problem_files()  # before publishing: an empty output's error follows the bad lines that explain it
        if plan.per_input_prefixes is None:
            what = f"{len(plan.files):,} input file(s) ({summary.bad_lines:,} bad lines, {len(summary.skipped_files)} skipped files)"
            outputs.publish(what)
    summary.outputs = outputs.published
    summary.seconds = time.perf_counter() - start
    if plan.shard is not None:
        write_manifest(manifest_path(plan.output_prefix), ShardManifest(
            inputs=manifest_inputs(plan.files), settings=plan.settings, outputs=summary.outputs,
            documents=summary.documents, tokens=summary.tokens, bad_lines=summary.bad_lines,
            skipped_files=[[r.path, r.error] for r in summary.skipped_files]))
    return summary


def usable_cpus() -> int:
    """CPUs this process may run on: a SLURM task's allocation, not the whole node, where the OS can tell."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (Megatron's names, plus the corpus and shard flags)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="files, directories and glob patterns (quote them) of .jsonl[.gz|.zst] or .parquet files; "
                            "a pipe such as /dev/stdin works")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys (parquet: columns) whose text is tokenized; one output per key")
    group.add_argument("--skip-bad-files", action="store_true",
                       help="leave out, and report, files that cannot be read to the end instead of stopping")
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
    group.add_argument("--output-per-input", action="store_true",
                       help="one dataset per input file: {prefix}_{path below the inputs' common directory}_{key}_document")
    group.add_argument("--allow-empty", action="store_true", help="write datasets even when they hold no documents")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=usable_cpus(),
                       help="tokenizing processes (default: the CPUs this process may use)")
    group.add_argument("--chunk-size", type=int, default=1024,
                       help=f"records per worker task (a task also ends at {CHUNK_BYTES // 1024} KiB)")
    group.add_argument("--log-interval", type=int, default=10000, help="log a progress line every this many documents")
    group.add_argument("--num-shards", type=int, help="split the input files into this many shards "
                       "(default: SLURM_ARRAY_TASK_COUNT in a SLURM array)")
    group.add_argument("--shard-index", type=int, help="the shard this run processes, from 0 "
                       "(default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN in a SLURM array)")
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
    if summary.already_complete:
        return summary
    shard = f"{summary.shard.tag}: " if summary.shard else ""
    print(
        f"{shard}{summary.documents:,} documents ({summary.empty_documents:,} empty), {summary.tokens:,} tokens, "
        f"{summary.bad_lines:,} bad lines skipped, {len(summary.skipped_files)} unreadable files left out, "
        f"from {summary.input_bytes / 2**20:.1f} MiB in {summary.files:,} file(s) "
        f"in {summary.seconds:.2f}s ({summary.tokens_per_second:,.0f} tokens/s, {summary.workers} worker(s))"
    )
    for prefix in summary.outputs[:10]:
        print(f"  {data_file_path(prefix)} {index_file_path(prefix)}")
    if len(summary.outputs) > 10:
        print(f"  ... and {len(summary.outputs) - 10:,} more datasets")
    return summary


if __name__ == "__main__":
    main()
