"""Finding and reading the files of a text corpus: jsonl (plain, gzip, zstd) and parquet.

`find_corpus_files` turns `--input` values (files, directories, glob patterns) into one
sorted list of files, so every run and every shard of a run sees the same order.
`open_records` reads one file as records: a jsonl line (bytes, parsed later by
megagrow.data.jsonl in a worker process) or a parquet row (a tuple of the text columns).
`batch_records` cuts the records of many files into tasks for worker processes: a task
may hold the tail of one file and several small files, a large file spans many tasks,
and each task says which file and line every record came from.

A file that cannot be read to its end (truncated gzip or zstd data, a parquet file
without the column) raises `UnreadableFile`, naming the file; `batch_records` turns it
into a failed segment so the caller decides whether the run stops or skips the file.
"""

from __future__ import annotations

import glob
import io
import os
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Sequence, Union

import zstandard

from megagrow.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
# What directories and globs pick up. Not a bare `.json`: beside corpus files lie JSON that
# is not jsonl (dataset_info.json in a Hugging Face snapshot, this tool's own shard
# manifests); a .json file named explicitly is still read.
FOUND_SUFFIXES = tuple(suffix for suffix in CORPUS_SUFFIXES if suffix != ".json")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_BYTES = 1 << 18  # compressed bytes fed to zstd at a time; output stays within a few MB
_PARQUET_BATCH_ROWS = 1024

# A record: one raw jsonl line, or the values of the text columns of one parquet row.
Record = Union[bytes, tuple]


class UnreadableFile(UserError):
    """A corpus file that cannot be opened or read to its end; the message names it and says why."""


def require_file(path: str | os.PathLike, what: str) -> None:
    """Raise a UserError naming `path` unless it exists and is not a directory (pipes are fine)."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}; check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory: {path}; pass a file")


def is_parquet_path(path: str | os.PathLike) -> bool:
    """True for paths named like parquet files."""
    return str(path).endswith(PARQUET_SUFFIXES)


def strip_corpus_suffix(name: str) -> str:
    """`name` without its format suffix (`.jsonl.zst`, `.parquet`, ...)."""
    for suffix in sorted(CORPUS_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# ------------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class CorpusFile:
    """One input file and its size on disk (0 for pipes, which have none)."""

    path: str
    size: int


def find_corpus_files(patterns: Sequence[str | os.PathLike]) -> list[CorpusFile]:
    """The files named by `--input` values, deduplicated and sorted by path.

    A file is taken whatever its name (its format is read from its content). A
    directory contributes every file under it, recursively, whose name ends in one of
    FOUND_SUFFIXES (hidden files and directories excluded); so does a glob pattern.
    """
    paths: set[str] = set()
    for pattern in map(str, patterns):
        if os.path.isdir(pattern):
            found = _corpus_files_under(pattern)
            if not found:
                raise UserError(f"--input {pattern}: no {'/'.join(FOUND_SUFFIXES)} files in this directory")
        elif os.path.exists(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    found += _corpus_files_under(match)
                elif match.endswith(FOUND_SUFFIXES):
                    found.append(match)
            if not found:
                raise UserError(f"--input {pattern}: the pattern matches no {'/'.join(FOUND_SUFFIXES)} files")
        else:
            raise UserError(f"input file not found: {pattern}; check the path")
        paths.update(os.path.normpath(p) for p in found)
    files = []
    for path in sorted(paths):
        try:
            size = os.stat(path).st_size if os.path.isfile(path) else 0
        except OSError as err:
            raise UserError(f"cannot read input file {path}: {err.strerror}; check it") from None
        files.append(CorpusFile(path, size))
    return files


def _corpus_files_under(directory: str) -> list[str]:
    """Corpus files below `directory`, in sorted walk order."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if n.endswith(FOUND_SUFFIXES) and not n.startswith(".")]
    return found


def per_input_names(files: Sequence[CorpusFile]) -> list[str]:
    """A unique name per file for `--output-per-input`: its path below the inputs' common directory, suffix and `/` replaced.

    `chunk1/example_train_0.jsonl.zst` under a common directory becomes
    `chunk1_example_train_0`; two files that would share a name are refused.
    """
    paths = [os.path.abspath(f.path) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    names = [strip_corpus_suffix(os.path.relpath(p, root)).replace(os.sep, "_") for p in paths]
    seen: dict[str, str] = {}
    for name, f in zip(names, files):
        if name in seen:
            raise UserError(
                f"--output-per-input: {seen[name]} and {f.path} would both write outputs named {name!r}; "
                f"rename one or process them in separate runs"
            )
        seen[name] = f.path
    return names


# ------------------------------------------------------------------------------ readers


class _Frames(io.RawIOBase):
    """Decompressed bytes of data made of compressed frames (zstd frames, gzip members), read in bounded steps.

    Data that ends inside a frame raises EOFError: zstandard's own stream readers stop
    quietly at the end of truncated data (and, by default, after the first frame), and a
    cut-off download must not pass for a short file. Python's GzipFile checks this too;
    gzip goes through here all the same, one reader for both (and ~1.3x faster).
    """

    def __init__(self, raw: BinaryIO, new_frame: Callable[[], object], kind: str):
        self._raw = raw
        self._new_frame = new_frame  # a fresh decompressobj, for the next frame
        self._kind = kind
        self._frame = None  # decompressobj of the frame being read; None between frames
        self._input = b""  # compressed bytes read but not yet decompressed
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if not self._input:
                self._input = self._raw.read(_READ_BYTES)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError(f"the data ends inside a {self._kind} frame")
                    return 0
            if self._frame is None:
                if not self._input.strip(b"\0"):  # zero padding after the last frame, as gzip allows
                    self._input = b""
                    continue
                self._frame = self._new_frame()
            self._output = memoryview(self._frame.decompress(self._input))
            self._input = b""
            if self._frame.eof:
                self._input, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n


_DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),  # gzip header and trailer (CRC, size) checked
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
}


class InputFile:
    """Lines (as bytes) of a plain, gzip or zstd file; the compression is recognised by its magic bytes.

    `position` is the offset in the file on disk, not in the decompressed stream, so a
    progress bar over the file sizes stays right for compressed inputs too.
    """

    def __init__(self, path: str | os.PathLike):
        require_file(path, "input file")
        self.path = str(path)
        # Pipes (e.g. /dev/stdin) have no size and no position; progress then shows no total.
        self.size = os.path.getsize(path) if os.path.isfile(path) else None
        try:
            self._raw = open(path, "rb")
        except OSError as err:
            raise UnreadableFile(f"cannot read input file {path}: {err.strerror}; check its permissions") from None
        magic = self._raw.peek(4)[:4]  # peek, not seek: pipes cannot seek
        self.compression = "gzip" if magic[:2] == _GZIP_MAGIC else "zstd" if magic == _ZSTD_MAGIC else None
        if self.compression:
            frames = _Frames(self._raw, _DECOMPRESSORS[self.compression], self.compression)
            self._reader: BinaryIO = io.BufferedReader(frames, buffer_size=1 << 20)
        else:
            self._reader = self._raw

    @property
    def position(self) -> int | None:
        """Bytes of the file on disk consumed so far (None for pipes)."""
        return self._raw.tell() if self.size is not None else None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._reader
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
            if self.compression is None:
                raise
            raise UnreadableFile(
                f"{self.path}: corrupt or truncated {self.compression} data ({err}); recreate the file"
            ) from None

    def close(self) -> None:
        """Close the reader and the file under it."""
        self._reader.close()
        self._raw.close()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ParquetRows:
    """Rows of a parquet file as tuples of the `columns` values, read one row group at a time."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        # Imported here, not at the top: pyarrow takes ~0.2 s to import, which every jsonl-only
        # run (and every worker start) would otherwise pay.
        import pyarrow
        import pyarrow.parquet

        self._errors = (pyarrow.ArrowException, OSError)
        self.path = str(path)
        self.columns = list(columns)
        require_file(path, "input file")
        try:
            self._file = pyarrow.parquet.ParquetFile(self.path)
        except self._errors as err:
            raise UnreadableFile(f"{self.path}: not a readable parquet file ({err}); recreate the file") from None
        schema = self._file.schema_arrow
        for column in self.columns:
            if column not in schema.names:
                raise UnreadableFile(
                    f"{self.path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                    f"name the text column with --json-keys"
                )
            kind = schema.field(column).type
            if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
                raise UnreadableFile(f"{self.path}: column {column!r} holds {kind}, not text; pick a text column with --json-keys")
        self.size = os.path.getsize(self.path)
        self._rows = max(self._file.metadata.num_rows, 1)
        self._rows_read = 0

    @property
    def position(self) -> int:
        """Bytes of the file on disk consumed so far, estimated from the rows read."""
        return self.size * self._rows_read // self._rows

    def __iter__(self) -> Iterator[tuple]:
        try:
            for row_group in range(self._file.num_row_groups):
                batches = self._file.iter_batches(
                    batch_size=_PARQUET_BATCH_ROWS, row_groups=[row_group], columns=self.columns, use_threads=False
                )
                for batch in batches:
                    values = [batch.column(i).to_pylist() for i in range(len(self.columns))]
                    for row in zip(*values):
                        self._rows_read += 1
                        yield row
        except self._errors as err:
            raise UnreadableFile(f"{self.path}: corrupt parquet data ({err}); recreate the file") from None

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> "ParquetRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_records(path: str | os.PathLike, keys: Sequence[str]) -> InputFile | ParquetRows:
    """A reader of `path`'s records: parquet rows of the `keys` columns, or raw jsonl lines."""
    try:
        return ParquetRows(path, keys) if is_parquet_path(path) else InputFile(path)
    except UserError as err:
        raise UnreadableFile(str(err)) from None


# ------------------------------------------------------------------------------ batching


@dataclass
class Segment:
    """The records of one file inside a RecordBatch, and what happens to that file there."""

    file_index: int  # into the list of files being read
    first_record: int  # line (jsonl) or row (parquet) number of the first record, from 1
    count: int = 0
    position: int = 0  # bytes of the file on disk consumed after these records
    starts_file: bool = False
    ends_file: bool = False
    error: str | None = None  # the file could not be read on from here; set with ends_file


@dataclass
class RecordBatch:
    """One worker task: records of one or more files, back to back, with the segment each came from."""

    records: list[Record] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    bytes: int = 0


def batch_records(files: Sequence[CorpusFile], keys: Sequence[str], max_records: int, max_bytes: int) -> Iterator[RecordBatch]:
    """RecordBatches of at most `max_records` records / about `max_bytes`, over all `files` in order."""
    batch = RecordBatch()
    for index, corpus_file in enumerate(files):
        segment = Segment(index, first_record=1, starts_file=True)
        batch.segments.append(segment)
        try:
            with open_records(corpus_file.path, keys) as reader:
                for record in reader:
                    batch.records.append(record)
                    batch.bytes += len(record) if isinstance(record, bytes) else sum(len(v or "") for v in record)
                    segment.count += 1
                    if len(batch.records) >= max_records or batch.bytes >= max_bytes:
                        segment.position = reader.position or 0
                        yield batch
                        batch = RecordBatch()
                        segment = Segment(index, first_record=segment.first_record + segment.count)
                        batch.segments.append(segment)
                segment.position = reader.position or 0
        except UnreadableFile as err:
            segment.error = str(err)
        segment.ends_file = True
    if batch.segments:
        yield batch
