"""Writing tokenized batches of many input files into indexed datasets, in input order.

The preprocessing tool's workers turn each RecordBatch (megagrow.data.corpus_inputs)
into an EncodedChunk; `BatchWriter` appends its documents to the open datasets (one per
json key, or one per key per input file), counts documents, tokens and bad records per
file, and handles a file that could not be read to its end: the run stops, or the file's
documents already written are rolled back so it contributes nothing. `ProgressReport`
shows files, documents, tokens, tokens/s and the ETA over the whole input.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from tqdm import tqdm

from megagrow.data.corpus_inputs import CorpusFile, RecordBatch, is_parquet_path
from megagrow.data.corpus_shards import ShardSpec
from megagrow.data.indexed_dataset import BuilderMark, IndexedDatasetBuilder, open_builder
from megagrow.data.jsonl import BadLineLog
from megagrow.errors import UserError

# Files whose first bad lines are kept and printed; past these only the counts are kept,
# so a corpus with a bad line in every one of 59,000 files costs no memory to speak of.
DETAILED_FILES = 20

@dataclass
class EncodedChunk:
    """Tokens of one batch of records: per json key, all good documents back to back plus their lengths."""

    bad_records: list[tuple[int, str]]  # (index in the batch, reason)
    tokens: list[np.ndarray]
    lengths: list[np.ndarray]


@dataclass
class FileReport:
    """What one input file gave: documents, tokens, bad records, and why it was left out if it was."""

    path: str
    bad_lines: BadLineLog
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    error: str | None = None


@dataclass
class PreprocessSummary:
    """What a run read and wrote."""

    files: int
    outputs: list[str]  # dataset prefixes, in the order written
    workers: int
    shard: ShardSpec | None = None
    already_complete: bool = False  # the shard's manifest showed it done; nothing was redone
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    bad_lines: int = 0
    problem_files: list[FileReport] = field(default_factory=list)  # with bad lines, or left out
    seconds: float = 0.0

    @property
    def skipped_files(self) -> list[FileReport]:
        """Files left out as unreadable (--skip-bad-files)."""
        return [r for r in self.problem_files if r.error]

    def print_problem_files(self) -> None:
        """Print the first bad lines of the files that had some, and the files left out, to stderr."""
        with_bad_lines = [r for r in self.problem_files if r.bad_lines.count]
        for report in with_bad_lines[:DETAILED_FILES]:
            print(report.bad_lines.report(report.path), file=sys.stderr)
        if len(with_bad_lines) > DETAILED_FILES:
            rest = with_bad_lines[DETAILED_FILES:]
            lines = sum(r.bad_lines.count for r in rest)
            print(f"... and {len(rest):,} more files with {lines:,} bad lines", file=sys.stderr)
        for report in self.skipped_files:
            print(f"left out: {report.error}", file=sys.stderr)

    @property
    def tokens_per_second(self) -> float:
        """Tokens written per second of wall time, start-up included."""
        return self.tokens / self.seconds if self.seconds else 0.0


class ProgressReport:
    """A bar over the input bytes with files, documents, tokens, tokens/s and ETA (on terminals), plus a log line every `log_interval` documents."""

    def __init__(self, files: Sequence[CorpusFile], log_interval: int, summary: PreprocessSummary, start: float):
        self.files = files
        self.total_bytes = sum(f.size for f in files)
        self.log_interval = log_interval
        self.summary = summary
        self.start = start
        self.bar = tqdm(total=self.total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="tokenizing", file=sys.stderr, disable=None)
        self.next_log = log_interval
        self.files_done = 0
        self.bytes_done = 0  # on-disk bytes of the files finished

    def update(self, position: int) -> None:
        """Advance to `position` bytes into the current file; log when another interval of documents is done."""
        s = self.summary
        position = self.bytes_done + position
        if s.documents < self.next_log and self.bar.disable:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        files = f"file {min(self.files_done + 1, len(self.files)):,}/{len(self.files):,}"
        rates = f"{s.documents:,} docs, {s.tokens:,} tokens, {s.tokens / elapsed:,.0f} tokens/s"
        if not self.bar.disable:
            self.bar.update(position - self.bar.n)
            self.bar.set_postfix_str(f"{files}, {rates}", refresh=False)
        if s.documents >= self.next_log:
            self.next_log = (s.documents // self.log_interval + 1) * self.log_interval
            eta = ""
            if self.total_bytes and position:
                eta = f", {position / self.total_bytes:.1%} of input, ETA {_clock(elapsed * (self.total_bytes / position - 1))}"
            self.write(f"processed {s.documents:,} documents ({files}, {s.tokens:,} tokens, "
                       f"{s.documents / elapsed:,.0f} docs/s, {s.tokens / elapsed:,.0f} tokens/s, "
                       f"{s.input_bytes / elapsed / 2**20:.2f} MiB/s{eta})")

    def file_done(self, corpus_file: CorpusFile) -> None:
        """Count a finished file."""
        self.files_done += 1
        self.bytes_done += corpus_file.size

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        # Line and newline in one write: an interrupt between two writes would glue
        # the next message (the one-line error) onto this one.
        self.bar.write(message + "\n", file=sys.stderr, end="")

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class OutputDatasets:
    """The datasets being written (one builder per json key); publishes them only when they hold documents or empties are allowed."""

    def __init__(self, json_keys: Sequence[str], dtype, allow_empty: bool):
        self.json_keys = list(json_keys)
        self.dtype = dtype
        self.allow_empty = allow_empty
        self.builders: list[IndexedDatasetBuilder] = []
        self.documents = 0
        self.published: list[str] = []

    def open(self, prefix: str) -> None:
        """Start one dataset per key under `prefix`."""
        self.builders = []
        for key in self.json_keys:
            self.builders.append(open_builder(f"{prefix}_{key}_document", self.dtype))
        self.documents = 0

    def add(self, tokens: Sequence[np.ndarray], lengths: Sequence[np.ndarray]) -> None:
        """Append the same documents' tokens of every key."""
        for builder, key_tokens, key_lengths in zip(self.builders, tokens, lengths):
            builder.add_documents(key_tokens, key_lengths)
        self.documents += len(lengths[0])

    def mark(self) -> tuple[int, list[BuilderMark]]:
        """The current end of every dataset, to roll back to."""
        return self.documents, [b.mark() for b in self.builders]

    def rollback(self, mark: tuple[int, list[BuilderMark]]) -> None:
        """Drop every document added after `mark`."""
        self.documents, marks = mark
        for builder, builder_mark in zip(self.builders, marks):
            builder.rollback(builder_mark)

    def publish(self, what: str) -> None:
        """Finish and rename the datasets into place; refuse in one line when they hold no documents."""
        if not self.documents and not self.allow_empty:
            raise UserError(
                f"no documents in {what}, so nothing was written; check --input and --json-keys "
                f"(pass --allow-empty to write empty datasets anyway)"
            )
        for builder in self.builders:
            builder.finalize()
            self.published.append(builder.prefix)
        self.builders = []

    def abort(self) -> None:
        """Drop the datasets not yet published."""
        for builder in self.builders:
            builder.abort()
        self.builders = []


@dataclass
class BatchWriter:
    """Writes encoded batches in input order: routes each file's documents, counts them, and handles unreadable files."""

    files: Sequence[CorpusFile]
    outputs: OutputDatasets
    per_input_prefixes: Sequence[str] | None  # one output prefix per file, or None for one output for all
    skip_bad_files: bool
    summary: PreprocessSummary
    progress: ProgressReport
    report: FileReport | None = field(default=None, init=False)  # of the file being written
    file_start: tuple | None = field(default=None, init=False)  # outputs' mark where that file's documents begin
    files_with_bad_lines: int = field(default=0, init=False)

    def write(self, batch: RecordBatch, encoded: EncodedChunk | None) -> None:
        """Write one batch's documents, segment by segment."""
        self.summary.input_bytes += batch.bytes
        records = documents = 0
        token_starts = [0] * len(self.outputs.json_keys)
        bad = encoded.bad_records if encoded else []
        for segment in batch.segments:
            if segment.starts_file:
                self._start_file(segment.file_index)
            in_segment = [(i, reason) for i, reason in bad if records <= i < records + segment.count]
            for i, reason in in_segment:
                self.report.bad_lines.add(segment.first_record + i - records, reason)
            good = segment.count - len(in_segment)
            if good:
                lengths = [key_lengths[documents : documents + good] for key_lengths in encoded.lengths]
                counts = [int(key_lengths.sum()) for key_lengths in lengths]
                tokens = [t[s : s + n] for t, s, n in zip(encoded.tokens, token_starts, counts)]
                token_starts = [s + n for s, n in zip(token_starts, counts)]
                self.outputs.add(tokens, lengths)
                self._count(good, sum(counts), sum(int((n == 0).sum()) for n in lengths))
            records += segment.count
            documents += good
            if segment.error:
                self._drop_file(segment.error)
            self.progress.update(segment.position)
            if segment.ends_file:
                self._end_file(segment.file_index)

    def _start_file(self, index: int) -> None:
        path = self.files[index].path
        self.report = FileReport(path, BadLineLog(unit="row" if is_parquet_path(path) else "line"))
        if self.per_input_prefixes is not None:
            self.outputs.open(self.per_input_prefixes[index])
        self.file_start = self.outputs.mark()

    def _count(self, documents: int, tokens: int, empty: int, sign: int = 1) -> None:
        for counts in (self.report, self.summary):
            counts.documents += sign * documents
            counts.tokens += sign * tokens
            counts.empty_documents += sign * empty

    def _drop_file(self, error: str) -> None:
        """Leave out the whole file that failed to read (or stop the run)."""
        if not self.skip_bad_files:
            raise UserError(f"{error} (or pass --skip-bad-files to leave unreadable files out)")
        self.outputs.rollback(self.file_start)
        report = self.report
        self._count(report.documents, report.tokens, report.empty_documents, sign=-1)
        report.documents = report.tokens = report.empty_documents = 0
        report.bad_lines = BadLineLog(unit=report.bad_lines.unit)
        report.error = error
        self.progress.write(f"skipped unreadable file: {error}")

    def _end_file(self, index: int) -> None:
        report = self.report
        self.summary.bad_lines += report.bad_lines.count
        if report.bad_lines.count and self.files_with_bad_lines >= DETAILED_FILES:
            report.bad_lines.first.clear()
        self.files_with_bad_lines += bool(report.bad_lines.count)
        if report.bad_lines.count or report.error:
            self.summary.problem_files.append(report)
        if self.per_input_prefixes is not None and not report.error:
            self.outputs.publish(report.path)
        elif self.per_input_prefixes is not None:
            self.outputs.abort()
        self.progress.file_done(self.files[index])


