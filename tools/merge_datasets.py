"""Merge several indexed datasets (e.g. shards preprocessed in parallel) into one.

    python tools/merge_datasets.py --input data/shard0_text_document data/shard1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document

Documents keep their order: all of the first input, then all of the second, and so on
(--input-dir takes the prefixes in the directory sorted by name). Every input must share
one token dtype, i.e. come from the same tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from megagrow.data.indexed_dataset import (
    IndexedDataset,
    data_file_path,
    dataset_exists,
    index_file_path,
    open_builder,
)
from megagrow.errors import UserError, exit_on_user_error


def prefixes_in_directory(directory: str | os.PathLike) -> list[str]:
    """Prefixes of the complete datasets (.bin and .idx) in a directory, sorted by name."""
    if not os.path.isdir(directory):
        raise UserError(f"--input-dir {directory}: not a directory; pass the directory holding the .bin/.idx pairs")
    prefixes = sorted(str(p.with_suffix("")) for p in Path(directory).glob("*.idx"))
    complete = [p for p in prefixes if dataset_exists(p)]
    if not complete:
        raise UserError(f"--input-dir {directory}: no .bin/.idx pairs found; preprocess data into it first")
    return complete


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Write the documents of `prefixes`, in order, as one dataset under `output_prefix`."""
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before anything is written
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{d.prefix} ({d.dtype})" for d in datasets)
        raise UserError(f"inputs have different token dtypes: {listing}; merge only datasets made with one tokenizer")
    output = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == output for p in prefixes):
        raise UserError(f"--output-prefix {output_prefix} is also an input; choose a new prefix")
    with open_builder(output_prefix, datasets[0].dtype) as builder:
        for prefix in tqdm(prefixes, desc="merging", unit=" datasets", file=sys.stderr, disable=None):
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx), merged in this order")
    source.add_argument("--input-dir", help="merge every dataset in this directory, sorted by name")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> IndexedDataset:
    """Merge and print what was written."""
    args = parse_args(argv)
    prefixes = args.input if args.input else prefixes_in_directory(args.input_dir)
    merged = merge(prefixes, args.output_prefix)
    print(
        f"merged {len(prefixes)} dataset(s): {merged.num_documents:,} documents, {len(merged):,} sequences, "
        f"{merged.num_tokens:,} tokens ({merged.dtype})\n"
        f"  {data_file_path(args.output_prefix)} {index_file_path(args.output_prefix)}"
    )
    return merged


if __name__ == "__main__":
    main()
