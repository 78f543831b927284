"""Print statistics of indexed datasets as a table.

    python tools/dataset_stats.py data/code_text_document data/prose_text_document

Columns: token dtype, sequences, documents, tokens, shortest / mean / longest document
in tokens, and the bytes of .bin + .idx on disk.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np

from megagrow.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megagrow.errors import exit_on_user_error


@dataclass(frozen=True)
class DatasetStats:
    """Summary numbers of one dataset."""

    prefix: str
    dtype: str
    sequences: int
    documents: int
    tokens: int
    min_document_tokens: int
    mean_document_tokens: float
    max_document_tokens: int
    bytes: int


def document_lengths(dataset: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document with no sequences has length 0)."""
    ends = np.concatenate(([0], np.cumsum(dataset.sizes, dtype=np.int64)))
    return ends[dataset.document_indices[1:]] - ends[dataset.document_indices[:-1]]


def dataset_stats(prefix: str) -> DatasetStats:
    """Statistics of the dataset at `prefix`."""
    dataset = IndexedDataset(prefix)
    lengths = document_lengths(dataset)
    has_documents = lengths.size > 0
    return DatasetStats(
        prefix=prefix,
        dtype=str(dataset.dtype),
        sequences=len(dataset),
        documents=dataset.num_documents,
        tokens=dataset.num_tokens,
        min_document_tokens=int(lengths.min()) if has_documents else 0,
        mean_document_tokens=float(lengths.mean()) if has_documents else 0.0,
        max_document_tokens=int(lengths.max()) if has_documents else 0,
        bytes=os.path.getsize(data_file_path(prefix)) + os.path.getsize(index_file_path(prefix)),
    )


def format_table(rows: list[DatasetStats]) -> str:
    """Right-aligned text table, one row per dataset (and a total row for several)."""
    header = ["dataset", "dtype", "sequences", "documents", "tokens", "min doc", "mean doc", "max doc", "bytes"]
    cells = [
        [
            r.prefix,
            r.dtype,
            f"{r.sequences:,}",
            f"{r.documents:,}",
            f"{r.tokens:,}",
            f"{r.min_document_tokens:,}",
            f"{r.mean_document_tokens:,.1f}",
            f"{r.max_document_tokens:,}",
            f"{r.bytes:,}",
        ]
        for r in rows
    ]
    if len(rows) > 1:
        cells.append(
            [
                "total",
                "",
                f"{sum(r.sequences for r in rows):,}",
                f"{sum(r.documents for r in rows):,}",
                f"{sum(r.tokens for r in rows):,}",
                "",
                "",
                "",
                f"{sum(r.bytes for r in rows):,}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = []
    for row in [header, *cells]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefixes", nargs="+", help="dataset prefixes (without .bin/.idx)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[DatasetStats]:
    """Print the table; returns the rows."""
    rows = [dataset_stats(p) for p in parse_args(argv).prefixes]
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
