"""Reading jsonl corpora (plain or gzip): one JSON object per line, text under chosen keys.

Shared by the tokenizer trainer and the preprocessor so both accept and reject exactly
the same lines. A line is bad when it is not valid UTF-8 JSON, not an object, lacks one
of the keys, or holds a non-string under one; bad lines are counted, never fatal.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Sequence

from megagrow.errors import UserError

_GZIP_MAGIC = b"\x1f\x8b"
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class BadLine(ValueError):
    """A jsonl line that holds no usable document; the message says why."""


def is_jsonl_path(path: str | os.PathLike) -> bool:
    """True for paths named like jsonl (optionally gzip-compressed) files."""
    return str(path).endswith(JSONL_SUFFIXES)


def require_file(path: str | os.PathLike, what: str) -> None:
    """Raise a UserError naming `path` unless it exists and is not a directory (pipes are fine)."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}; check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory: {path}; pass a file")


class InputFile:
    """Lines (as bytes) of a plain or gzip file; gzip is recognised by its magic bytes.

    `position` is the offset in the file on disk, not in the decompressed stream, so a
    progress bar over `size` stays right for compressed inputs too.
    """

    def __init__(self, path: str | os.PathLike):
        require_file(path, "input file")
        self.path = str(path)
        # Pipes (e.g. /dev/stdin) have no size and no position; progress then shows no total.
        self.size = os.path.getsize(path) if os.path.isfile(path) else None
        try:
            self._raw = open(path, "rb")
        except OSError as err:
            raise UserError(f"cannot read input file {path}: {err.strerror}; check its permissions") from None
        self.compressed = self._raw.peek(2)[:2] == _GZIP_MAGIC  # peek, not seek: pipes cannot seek
        self._reader: BinaryIO = gzip.GzipFile(fileobj=self._raw, mode="rb") if self.compressed else self._raw

    @property
    def position(self) -> int | None:
        """Bytes of the file on disk consumed so far (None for pipes)."""
        return self._raw.tell() if self.size is not None else None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._reader
        except (EOFError, OSError, zlib.error) as err:
            if not self.compressed:
                raise
            raise UserError(f"{self.path}: corrupt or truncated gzip data ({err}); recreate the file") from None

    def close(self) -> None:
        """Close the reader and the file under it."""
        self._reader.close()
        self._raw.close()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def document_fields(line: bytes | str, keys: Sequence[str]) -> list[str]:
    """The strings under `keys` in one jsonl line, in the order of `keys`; raises BadLine."""
    if not line.strip():
        raise BadLine("blank line")
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise BadLine("not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadLine(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadLine(f"not a JSON object (got {type(record).__name__})")
    fields = []
    for key in keys:
        if key not in record:
            raise BadLine(f"missing key {key!r}")
        value = record[key]
        if not isinstance(value, str):
            raise BadLine(f"value of {key!r} is not a string (got {type(value).__name__})")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"); no tokenizer takes them
            raise BadLine(f"value of {key!r} is not valid Unicode (lone surrogate)") from None
        fields.append(value)
    return fields


@dataclass
class BadLineLog:
    """Counts bad lines of one input and keeps the first few (line number, reason) to report."""

    keep: int = 10
    count: int = 0
    first: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line_number: int, reason: str) -> None:
        """Record bad line `line_number` (1-based)."""
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append((line_number, reason))

    def extend(self, bad: Sequence[tuple[int, str]]) -> None:
        """Record several bad lines, in file order."""
        for line_number, reason in bad:
            self.add(line_number, reason)

    def report(self, path: str | os.PathLike) -> str:
        """A short multi-line summary naming the file and the first bad lines."""
        if not self.count:
            return f"{path}: no bad lines"
        lines = [f"{path}: skipped {self.count} bad line(s); first {len(self.first)}:"]
        lines += [f"  line {number}: {reason}" for number, reason in self.first]
        return "\n".join(lines)


def iter_documents(path: str | os.PathLike, keys: Sequence[str], bad_lines: BadLineLog) -> Iterator[list[str]]:
    """Yield the `keys` fields of every good line of a jsonl file; bad lines go to `bad_lines`."""
    with InputFile(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                yield document_fields(line, keys)
            except BadLine as err:
                bad_lines.add(line_number, str(err))
