"""Merge several indexed datasets (e.g. shards preprocessed in parallel) into one, or blend them by tokens.

    python tools/merge_datasets.py --input data/shard0_text_document data/shard1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input 'data/slim_shard*_text_document' --output-prefix data/slim_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document
    python tools/merge_datasets.py --input 'data/slim_shard*_text_document' --write-mix slim.mix --mix-weight 0.7

Documents keep their order: all of the first input, then all of the second, and so on.
An --input value with glob characters (quote it) stands for the prefixes of every
`.idx` it matches, sorted by name, as does --input-dir for a directory. Shards written by
tools/preprocess_data.py --num-shards K (`..._shard00003of00008_...`) must all be there,
once each: a merge that lacks one refuses in one line rather than lose its documents.
Every input must share one token dtype, i.e. come from the same tokenizer.

--write-mix merges nothing: it writes a `--data-path @file` mix that names every input
with a weight proportional to its tokens (times --mix-weight), so training samples the
shards as the merged dataset would hold them. Mix files of several corpora concatenate
(`cat slim.mix star.mix > all.mix`) into one blend at their --mix-weight ratio.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from tqdm import tqdm

from megagrow.data.blended_dataset import write_data_path_file
from megagrow.data.corpus_shards import check_complete_shard_sets
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


def expand_prefixes(values: list[str]) -> list[str]:
    """Dataset prefixes from --input values: a plain prefix as given, a glob pattern as the sorted prefixes of the .idx files it matches."""
    prefixes = []
    for value in values:
        if glob.has_magic(value) and not dataset_exists(value):
            matches = sorted(path[: -len(".idx")] for path in glob.glob(index_file_path(value)))
            complete = [p for p in matches if dataset_exists(p)]
            if not complete:
                raise UserError(f"--input {value}: the pattern matches no .bin/.idx pairs; check it (quote it for the shell)")
            prefixes += complete
        else:
            prefixes.append(value)
    return prefixes


def write_mix(prefixes: list[str], path: str, weight: float) -> list[IndexedDataset]:
    """Write a `--data-path @path` mix of `prefixes`, each weighted by its share of the tokens times `weight`."""
    datasets = [IndexedDataset(p) for p in prefixes]
    total = sum(d.num_tokens for d in datasets)
    if not total:
        raise UserError(f"the {len(datasets)} input dataset(s) hold no tokens; nothing to blend")
    weights = [weight * d.num_tokens / total for d in datasets]
    comment = f"{len(datasets)} datasets, {total:,} tokens, weighted by tokens to {weight:g} in all (tools/merge_datasets.py)"
    write_data_path_file(path, weights, prefixes, comment=comment)
    return datasets


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
    source.add_argument("--input", nargs="+",
                        help="dataset prefixes (without .bin/.idx), merged in this order; glob patterns allowed")
    source.add_argument("--input-dir", help="merge every dataset in this directory, sorted by name")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output-prefix", help="prefix of the merged dataset")
    output.add_argument("--write-mix", metavar="FILE",
                        help="instead of merging, write a --data-path @FILE mix weighting each input by its tokens")
    parser.add_argument("--mix-weight", type=float, default=1.0,
                        help="total weight of the inputs in the --write-mix file (e.g. 0.7 for this corpus's share)")
    args = parser.parse_args(argv)
    if not args.mix_weight > 0:
        parser.error("--mix-weight must be positive")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> IndexedDataset | list[IndexedDataset]:
    """Merge (or write the mix) and print what was written."""
    args = parse_args(argv)
    prefixes = expand_prefixes(args.input) if args.input else prefixes_in_directory(args.input_dir)
    check_complete_shard_sets(prefixes)
    if args.write_mix:
        datasets = write_mix(prefixes, args.write_mix, args.mix_weight)
        print(f"wrote {args.write_mix}: {len(datasets)} dataset(s), {sum(d.num_tokens for d in datasets):,} tokens; "
              f"train with --data-path @{args.write_mix}")
        return datasets
    merged = merge(prefixes, args.output_prefix)
    print(
        f"merged {len(prefixes)} dataset(s): {merged.num_documents:,} documents, {len(merged):,} sequences, "
        f"{merged.num_tokens:,} tokens ({merged.dtype})\n"
        f"  {data_file_path(args.output_prefix)} {index_file_path(args.output_prefix)}"
    )
    return merged


if __name__ == "__main__":
    main()
