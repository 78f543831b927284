"""The fields of one corpus record: a jsonl line (one JSON object, text under chosen keys) or a parquet row.

Shared by the tokenizer trainer and the preprocessor so both accept and reject exactly
the same records. A record is bad when it is not valid UTF-8 JSON, not an object, lacks
one of the keys, or holds a non-string (a null included) under one; bad records are
counted and reported by line number, never fatal. Opening and decompressing files is
megagrow.data.corpus_inputs' job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

# require_file is imported by tools/train_tokenizer.py from here.
from megagrow.data.corpus_inputs import JSONL_SUFFIXES, InputFile, require_file  # noqa: F401


class BadLine(ValueError):
    """A record that holds no usable document; the message says why."""


def is_jsonl_path(path: str | os.PathLike) -> bool:
    """True for paths named like jsonl files (optionally gzip- or zstd-compressed)."""
    return str(path).endswith(JSONL_SUFFIXES)


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
        fields.append(text_value(key, record[key]))
    return fields


def column_fields(values: Sequence[object], keys: Sequence[str]) -> list[str]:
    """The strings of one parquet row's `keys` columns (given in that order); raises BadLine."""
    return [text_value(key, value) for key, value in zip(keys, values)]


def text_value(key: str, value: object) -> str:
    """`value` if it is text a tokenizer takes; raises BadLine naming `key` otherwise."""
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise BadLine(f"value of {key!r} is not a string (got {got})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"); no tokenizer takes them
        raise BadLine(f"value of {key!r} is not valid Unicode (lone surrogate)") from None
    return value


@dataclass
class BadLineLog:
    """Counts bad lines of one input and keeps the first few (line number, reason) to report."""

    keep: int = 10
    unit: str = "line"  # "row" for parquet files
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
        lines = [f"{path}: skipped {self.count} bad {self.unit}(s); first {len(self.first)}:"]
        lines += [f"  {self.unit} {number}: {reason}" for number, reason in self.first]
        return "\n".join(lines)


def iter_documents(path: str | os.PathLike, keys: Sequence[str], bad_lines: BadLineLog) -> Iterator[list[str]]:
    """Yield the `keys` fields of every good line of a jsonl file; bad lines go to `bad_lines`."""
    with InputFile(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                yield document_fields(line, keys)
            except BadLine as err:
                bad_lines.add(line_number, str(err))
