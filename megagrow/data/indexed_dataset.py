"""Megatron's memory-mapped indexed dataset: `prefix.bin` (tokens) + `prefix.idx` (index).

Byte layout of `.idx` (little-endian), identical to Megatron-LM so datasets move
between the two unchanged:

    magic            9 bytes  b"MMIDIDX\\x00\\x00"
    version          <Q       1
    dtype code       <B       see DTYPE_CODES
    sequence count   <Q       S
    document count   <Q       D  (entries of document_indices, i.e. documents + 1)
    sizes            int32[S]  tokens per sequence
    pointers         int64[S]  byte offset of each sequence in .bin
    document_indices int64[D]  sequence index where each document starts; last == S

`.bin` holds the token arrays back to back. Without sentence splitting every
document is one sequence, which is what the GPT dataset indexes.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from megagrow.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def data_file_path(prefix: str | os.PathLike) -> str:
    """Path of the token file for a dataset prefix."""
    return f"{prefix}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    """Path of the index file for a dataset prefix."""
    return f"{prefix}.idx"


def token_dtype_for_vocab(vocab_size: int) -> type:
    """Smallest token dtype Megatron uses for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """True when both files of a dataset prefix exist."""
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDataset:
    """Zero-copy reader: each sequence is a view into the memory-mapped `.bin`."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(
                    f"dataset file not found: {path} (pass the prefix without .bin/.idx, "
                    f"as written by tools/preprocess_data.py)"
                )
        self.dtype, self.sizes, self.pointers, self.document_indices = _read_index(idx_path)
        bin_bytes = os.path.getsize(bin_path)
        _check_against_bin(idx_path, bin_path, bin_bytes, self.dtype, self.sizes, self.pointers)
        if bin_bytes == 0:  # np.memmap cannot map an empty file
            self._tokens = np.zeros(0, dtype=self.dtype)
        else:
            self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")

    def __getstate__(self) -> dict:
        # Pickle by path: memmaps would otherwise be copied whole into every DataLoader
        # worker started by spawn/forkserver.
        return {"prefix": self.prefix}

    def __setstate__(self, saved: dict) -> None:
        self.__init__(saved["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i from `offset`, `length` of them (to the end when None); a view."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}:{offset + length}] outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) // self._tokens.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def num_documents(self) -> int:
        """Number of documents (document_indices has one more entry)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return int(self.sizes.sum(dtype=np.int64))

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences back to back); a view."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == last:
            return self._tokens[0:0]
        start = int(self.pointers[first]) // self._tokens.itemsize
        stop = int(self.pointers[last - 1]) // self._tokens.itemsize + int(self.sizes[last - 1])
        return self._tokens[start:stop]


def _read_index(idx_path: str):
    """Parse and validate the header and arrays of an `.idx` file (arrays are memory-mapped)."""
    file_bytes = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise UserError(f"{idx_path}: truncated index ({file_bytes} bytes, header needs {_HEADER.size}); rebuild the dataset")
    magic, version, code, seq_count, doc_count = _HEADER.unpack(head)
    if magic != MAGIC:
        raise UserError(f"{idx_path}: not a Megatron mmap index (bad magic {magic!r}); rebuild it with tools/preprocess_data.py")
    if version != VERSION:
        raise UserError(f"{idx_path}: index version {version} is not supported (expected {VERSION}); rebuild the dataset")
    if code not in DTYPE_CODES:
        raise UserError(f"{idx_path}: unknown dtype code {code}; the file is corrupt, rebuild the dataset")
    expected = _HEADER.size + 4 * seq_count + 8 * seq_count + 8 * doc_count
    if file_bytes != expected:
        raise UserError(
            f"{idx_path}: index is {file_bytes} bytes but its header ({seq_count} sequences, "
            f"{doc_count} document indices) needs {expected}; the file is truncated or corrupt, rebuild it"
        )
    offset = _HEADER.size
    sizes = _map(idx_path, np.int32, offset, seq_count)
    offset += 4 * seq_count
    pointers = _map(idx_path, np.int64, offset, seq_count)
    offset += 8 * seq_count
    document_indices = _map(idx_path, np.int64, offset, doc_count)
    if doc_count == 0 or document_indices[0] != 0 or document_indices[-1] != seq_count:
        raise UserError(f"{idx_path}: document indices must start at 0 and end at {seq_count}; the index is corrupt, rebuild it")
    if doc_count > 1 and np.any(np.diff(document_indices) < 0):
        raise UserError(f"{idx_path}: document indices are not increasing; the index is corrupt, rebuild it")
    return np.dtype(DTYPE_CODES[code]), sizes, pointers, document_indices


def _map(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _check_against_bin(idx_path, bin_path, bin_bytes, dtype, sizes, pointers) -> None:
    """Sequences must lie back to back in .bin and fill it exactly."""
    if len(sizes) == 0:
        if bin_bytes != 0:
            raise UserError(f"{bin_path}: {bin_bytes} bytes but {idx_path} lists no sequences; rebuild the dataset")
        return
    if np.any(sizes < 0):
        raise UserError(f"{idx_path}: negative sequence sizes; the index is corrupt, rebuild it")
    ends = np.cumsum(sizes, dtype=np.int64) * dtype.itemsize
    starts = np.concatenate(([0], ends[:-1]))
    if not np.array_equal(starts, pointers):
        bad = int(np.flatnonzero(starts != pointers)[0])
        raise UserError(
            f"{idx_path}: pointer of sequence {bad} is {int(pointers[bad])}, expected {int(starts[bad])}; "
            f"the index is corrupt, rebuild it"
        )
    if int(ends[-1]) != bin_bytes:
        raise UserError(
            f"{bin_path}: {bin_bytes} bytes but {idx_path} describes {int(ends[-1])}; "
            f"the pair is truncated or mismatched, rebuild the dataset"
        )


# Index entries stream through temporary files in blocks of this many, so writing a dataset
# of any number of documents (a merge of thousands of shards included) holds one block in
# memory, never a Python list with an entry per document.
_INDEX_BLOCK = 1 << 16


def write_index(idx_path: str, dtype, sizes: Sequence[int], document_indices: Sequence[int]) -> None:
    """Write an `.idx` file for sequences stored back to back (pointers follow from sizes)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        _write_index(f, dtype, len(sizes), len(document_indices), lambda: [sizes], [document_indices])


def _write_index(f: BinaryIO, dtype, sequence_count: int, document_count: int,
                 size_blocks: Callable[[], Iterable[np.ndarray]], document_index_blocks: Iterable[np.ndarray]) -> None:
    """Write a whole `.idx` to `f`; `size_blocks()` is called twice (sizes, then the pointers computed from them)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {dtype} has no Megatron dtype code")
    f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[dtype], sequence_count, document_count))
    for block in size_blocks():
        f.write(np.ascontiguousarray(block, dtype=np.int32))
    offset = 0  # byte offset in .bin of the next block's first sequence
    for block in size_blocks():
        pointers = np.empty(len(block), dtype=np.int64)
        pointers[0:1] = offset
        np.cumsum(block[:-1], dtype=np.int64, out=pointers[1:])
        pointers[1:] *= dtype.itemsize
        pointers[1:] += offset
        f.write(pointers)
        if len(block):
            offset = int(pointers[-1]) + int(block[-1]) * dtype.itemsize
    for block in document_index_blocks:
        f.write(np.ascontiguousarray(block, dtype=np.int64))
    f.flush()
    os.fsync(f.fileno())


class _ArrayFile:
    """An append-only array of one dtype in a temporary file, with a short tail kept in memory."""

    def __init__(self, path: str, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self._file = open(path, "w+b")
        self._written = 0
        self._tail: list[int] = []

    def __len__(self) -> int:
        return self._written + len(self._tail)

    def append(self, value: int) -> None:
        """Append one entry."""
        self._tail.append(value)
        if len(self._tail) >= _INDEX_BLOCK:
            self._flush_tail()

    def extend(self, values: np.ndarray) -> None:
        """Append many entries."""
        self._flush_tail()
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self._written += len(values)

    def truncate(self, length: int) -> None:
        """Keep only the first `length` entries."""
        self._flush_tail()
        self._file.truncate(length * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)
        self._written = length

    def blocks(self) -> Iterator[np.ndarray]:
        """All entries, in blocks of at most _INDEX_BLOCK."""
        self._flush_tail()
        self._file.seek(0)
        while data := self._file.read(_INDEX_BLOCK * self.dtype.itemsize):
            yield np.frombuffer(data, dtype=self.dtype)

    def remove(self) -> None:
        """Close and delete the file."""
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def _flush_tail(self) -> None:
        if self._tail:
            self._file.write(np.array(self._tail, dtype=self.dtype).tobytes())
            self._written += len(self._tail)
            self._tail = []


@dataclasses.dataclass(frozen=True)
class BuilderMark:
    """A point in a build that `IndexedDatasetBuilder.rollback` can return to."""

    data_bytes: int
    sequences: int
    document_indices: int


class IndexedDatasetBuilder:
    """Streams sequences into `prefix.bin/.idx` under temporary names; `finalize` publishes both.

    Until `finalize` runs nothing exists under the final names, so an interrupted
    build never leaves a valid-looking half dataset (`abort` removes the temporaries).
    Sizes and document indices go to temporary files too: memory stays flat however
    many documents are written.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp, self._idx_tmp, sizes_tmp, documents_tmp = temporary_paths(self.prefix, os.getpid())
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = _ArrayFile(sizes_tmp, np.int32)
        self._document_indices = _ArrayFile(documents_tmp, np.int64)
        self._document_indices.append(0)
        self._last_document_end = 0  # sequence count at the last end_document

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._sizes.append(int(array.size))

    def end_document(self) -> None:
        """Mark the sequences added since the last call as one document."""
        self._last_document_end = len(self._sizes)
        self._document_indices.append(self._last_document_end)

    def add_document(self, tokens: Iterable[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append a document: one sequence, or several split by `lengths`."""
        array = np.asarray(tokens, dtype=self.dtype)
        if lengths is None:
            self.add_item(array)
        else:
            if sum(lengths) != array.size:
                raise ValueError("sequence lengths do not add up to the document length")
            self._bin.write(array.tobytes(order="C"))
            self._sizes.extend(np.asarray(lengths, dtype=np.int32))
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents stored back to back in `tokens`, one sequence each; a length of 0 is a document without sequences."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError("document lengths do not add up to the tokens given")
        self._bin.write(tokens.tobytes(order="C"))
        nonempty = lengths > 0
        ends = len(self._sizes) + np.cumsum(nonempty, dtype=np.int64)
        self._sizes.extend(lengths[nonempty])
        self._document_indices.extend(ends)
        if len(ends):
            self._last_document_end = int(ends[-1])

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every document of another dataset with the same dtype (used to merge shards)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{prefix}: dtype {other.dtype} differs from {self.dtype}; datasets to merge must share a tokenizer")
        base = len(self._sizes)
        for start in range(0, len(other.sizes), _INDEX_BLOCK):
            self._sizes.extend(other.sizes[start : start + _INDEX_BLOCK])
        for start in range(1, len(other.document_indices), _INDEX_BLOCK):
            self._document_indices.extend(other.document_indices[start : start + _INDEX_BLOCK] + base)
        self._last_document_end = len(self._sizes)
        with open(data_file_path(prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._bin.write(chunk)

    def mark(self) -> BuilderMark:
        """The current end of the build, to `rollback` to if what follows must be dropped."""
        return BuilderMark(self._bin.tell(), len(self._sizes), len(self._document_indices))

    def rollback(self, mark: BuilderMark) -> None:
        """Drop every sequence and document added after `mark`."""
        self._bin.truncate(mark.data_bytes)
        self._bin.seek(mark.data_bytes)
        self._sizes.truncate(mark.sequences)
        self._document_indices.truncate(mark.document_indices)
        self._last_document_end = mark.sequences

    def finalize(self) -> None:
        """Flush, write the index and rename both files into place (.bin first, .idx last)."""
        if self._last_document_end != len(self._sizes):
            self.end_document()  # sequences added without end_document form a last document
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            _write_index(f, self.dtype, len(self._sizes), len(self._document_indices),
                         self._sizes.blocks, self._document_indices.blocks())
        self._sizes.remove()
        self._document_indices.remove()
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))

    def abort(self) -> None:
        """Drop the temporary files; nothing is published."""
        if not self._bin.closed:
            self._bin.close()
        self._sizes.remove()
        self._document_indices.remove()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def temporary_paths(prefix: str | os.PathLike, pid: int | str) -> tuple[str, str, str, str]:
    """Where a builder in process `pid` writes `prefix`'s .bin, .idx, sizes and document indices before publishing."""
    suffix = f".tmp-{pid}"
    return (data_file_path(prefix) + suffix, index_file_path(prefix) + suffix,
            f"{prefix}.sizes{suffix}", f"{prefix}.docs{suffix}")


def stale_temporaries(prefixes: Iterable[str | os.PathLike]) -> list[str]:
    """Temporary files that other processes (a killed build) left for any of these dataset prefixes.

    Each directory is listed once, so this stays quick for the thousands of prefixes
    of a run with an output per input file.
    """
    wanted: dict[str, set[str]] = {}
    for prefix in prefixes:
        directory, base = os.path.split(os.path.abspath(prefix))
        wanted.setdefault(directory, set()).update(
            os.path.basename(path).removesuffix(".tmp-0") for path in temporary_paths(base, 0)
        )
    own = str(os.getpid())
    stale = []
    for directory, names in sorted(wanted.items()):
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            head, marker, pid = name.rpartition(".tmp-")
            if marker and head in names and pid.isdigit() and pid != own:
                stale.append(os.path.join(directory, name))
    return stale


def open_builder(prefix: str | os.PathLike, dtype, flag: str = "--output-prefix") -> IndexedDatasetBuilder:
    """A builder for `prefix`, failing in one line (naming `flag`) when its directory cannot be written."""
    try:
        return IndexedDatasetBuilder(prefix, dtype)
    except OSError as err:
        raise UserError(f"cannot write {err.filename or prefix}: {err.strerror}; check {flag}") from None
