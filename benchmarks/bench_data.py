"""Data pipeline benchmarks: each section times megagrow's code against a reference in the same run.

    python benchmarks/bench_data.py                      # every section
    python benchmarks/bench_data.py --sections sample_idx --documents 100000

Sections (add one by writing a function `args -> Table` whose first row is the code under
test, its arguments in `main`, and an entry in SECTIONS):
  sample_idx  C++ build_sample_idx vs the loop and vectorised numpy references
  blending    C++ build_blending_indices (megatron-core's and Tijdeman's rule) vs megatron-core's own
              C++ helper (when megatron-core is installed) and the numpy references
  preprocess  tools/preprocess_data.py with 2 workers vs 1 worker

Times are the best of --repeats runs (the Python loops run once). With
--loop-fraction below 1 the loops run on that share of the samples and their time
is scaled linearly (both are linear scans); the "measured on" column says so. The
blending loops run on at most BLEND_LOOP_SAMPLES samples, scaled the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from megagrow.data.index_reference import (
    build_blending_indices_loop,
    build_sample_idx_loop,
    build_sample_idx_vectorized,
)
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.data.native import build_blending_indices, build_sample_idx


@dataclasses.dataclass
class Table:
    """One section's result: a row per implementation, the first row being the one measured against."""

    title: str
    rows: list[tuple[str, str, float]]  # (implementation, measured on, seconds for the full input)
    notes: list[str] = dataclasses.field(default_factory=list)
    ratio_label: str = "C++ speed-up"  # what "other row's time / first row's time" means here

    def render(self) -> str:
        """The table as aligned text, with each row's time relative to the first row."""
        base = self.rows[0][2]
        header = ("implementation", "measured on", "ms", self.ratio_label)
        body = [(name, on, f"{seconds * 1e3:.1f}", f"{seconds / base:.1f}x") for name, on, seconds in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [f"## {self.title}", *self.notes]
        for row in [header, tuple("-" * w for w in widths), *body]:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return "\n".join(lines)


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_document_sizes(num_documents: int, mean_tokens: float, seed: int) -> np.ndarray:
    """Lognormal document lengths (sigma 1, like web text) with the given mean, at least one token each."""
    sigma = 1.0
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(math.log(mean_tokens) - sigma**2 / 2, sigma, num_documents)
    return np.maximum(sizes, 1).astype(np.int32)


def bench_sample_idx(args: argparse.Namespace) -> Table:
    """C++ build_sample_idx against the loop and vectorised references on one synthetic epoch."""
    sizes = synthetic_document_sizes(args.documents, args.mean_tokens, args.seed)
    doc_idx = np.random.RandomState(args.seed).permutation(len(sizes)).astype(np.int32)
    total_tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (total_tokens - 1) // args.seq_length

    expected = build_sample_idx(sizes, doc_idx, args.seq_length, num_samples)
    if not np.array_equal(build_sample_idx_vectorized(sizes, doc_idx, args.seq_length, num_samples), expected):
        raise AssertionError("vectorised reference disagrees with the C++ sample index")
    cpp = best_time(lambda: build_sample_idx(sizes, doc_idx, args.seq_length, num_samples), args.repeats)
    vectorised = best_time(
        lambda: build_sample_idx_vectorized(sizes, doc_idx, args.seq_length, num_samples), args.repeats
    )
    # The loop's cost is proportional to the samples it builds: time a fraction, scale up.
    part = max(1, int(num_samples * args.loop_fraction))
    loop = best_time(lambda: build_sample_idx_loop(sizes, doc_idx, args.seq_length, part), 1)
    np.testing.assert_array_equal(build_sample_idx_loop(sizes, doc_idx, args.seq_length, min(part, 1000)),
                                  expected[: min(part, 1000) + 1])
    fraction = f"{part / num_samples:.0%} of samples, scaled" if part < num_samples else "all"
    return Table(
        title=f"build_sample_idx: {len(sizes):,} documents, {total_tokens / 1e9:.2f}B tokens, "
        f"seq {args.seq_length} -> {num_samples:,} samples",
        rows=[
            ("C++ (megagrow._helpers)", "all", cpp),
            ("numpy cumsum + searchsorted", "all", vectorised),
            ("Python loop reference", fraction, loop * num_samples / part),
        ],
    )


def _megatron_core_blending():
    """megatron-core's build_blending_indices and a note on where it came from, or None when not installed."""
    try:
        with warnings.catch_warnings():  # megatron.core warns at import that apex and TE are absent
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers, helpers_cpp
    except ImportError:
        return None
    # 0.16.1's wheel ships helpers_cpp compiled (GCC, no FMA); it is timed as installed, not rebuilt.
    note = (f"megatron-core {importlib.metadata.version('megatron-core')}: helpers.build_blending_indices from "
            f"{Path(helpers_cpp.__file__).name} as installed from its wheel")

    def build(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        # As its BlendedDataset calls it: zeroed output arrays, weights as a list.
        dataset_index = np.zeros(size, dtype=np.int16)
        dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, dataset_sample_index, weights.tolist(), len(weights), size,
                                       False)
        return dataset_index, dataset_sample_index

    return build, note


# The numpy loops take ~15 us per sample: time at most this many and scale.
BLEND_LOOP_SAMPLES = 200_000


def bench_blending(args: argparse.Namespace) -> Table:
    """C++ build_blending_indices (both rules) against megatron-core's helper and the numpy loop references."""
    weights = np.random.default_rng(args.seed).dirichlet(np.ones(args.datasets))
    size = args.blend_samples
    expected = build_blending_indices(weights, size, "megatron")
    rows = [("C++ megatron rule (megagrow._helpers)", "all",
             best_time(lambda: build_blending_indices(weights, size, "megatron"), args.repeats))]
    notes = [f"weights {np.round(weights, 3).tolist()}"]
    megatron_core = _megatron_core_blending()
    if megatron_core is not None:
        build, note = megatron_core
        for got, want in zip(build(weights, size), expected):
            np.testing.assert_array_equal(got, want)  # the same order, bit for bit
        rows.append(("megatron-core's C++ helper (output arrays allocated as it does)", "all",
                     best_time(lambda: build(weights, size), args.repeats)))
        notes.append(note)
    else:
        notes.append("megatron-core not installed: no megatron-core row")
    rows.append(("C++ tijdeman rule (megagrow._helpers)", "all",
                 best_time(lambda: build_blending_indices(weights, size, "tijdeman"), args.repeats)))
    part = max(1, min(BLEND_LOOP_SAMPLES, int(size * args.loop_fraction)))
    fraction = f"{part / size:.0%} of samples, scaled" if part < size else "all"
    for rule in ("megatron", "tijdeman"):
        loop = best_time(lambda: build_blending_indices_loop(weights, part, rule), 1)
        reference = build_blending_indices_loop(weights, min(part, 1000), rule)
        for got, want in zip(reference, build_blending_indices(weights, min(part, 1000), rule)):
            np.testing.assert_array_equal(got, want)
        rows.append((f"numpy loop reference, {rule} rule", fraction, loop * size / part))
    return Table(title=f"build_blending_indices: {args.datasets} datasets, {size:,} samples", rows=rows, notes=notes)


def bench_preprocess(args: argparse.Namespace) -> Table:
    """tools/preprocess_data.py with 2 workers against 1 worker, on real text from this machine."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        def tool(name: str, *flags: str) -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(root / "tools" / name), *flags], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - start

        tool("build_corpus.py", "--output-dir", tmp, "--domains", "code", "--max-bytes-per-domain",
             str(args.corpus_bytes))
        corpus = str(Path(tmp) / "code.jsonl")
        tool("train_tokenizer.py", "--input", corpus, "--output-prefix", f"{tmp}/tok", "--vocab-size", "8000",
             "--max-sentences", "200000")
        times = {}
        for workers in (2, 1):
            times[workers] = min(
                tool("preprocess_data.py", "--input", corpus, "--output-prefix", f"{tmp}/out{workers}",
                     "--tokenizer-model", f"{tmp}/tok.model", "--append-eod", "--workers", str(workers))
                for _ in range(args.repeats))
        tokens = IndexedDataset(f"{tmp}/out1_text_document").num_tokens
    return Table(
        title=f"preprocess_data.py: {args.corpus_bytes / 1e6:.0f} MB of stdlib source, {tokens:,} tokens "
              f"(wall time of the command, start-up included)",
        rows=[(f"--workers 2 ({tokens / times[2]:,.0f} tokens/s)", "all", times[2]),
              (f"--workers 1 ({tokens / times[1]:,.0f} tokens/s)", "all", times[1])],
        ratio_label="2-worker speed-up",
    )


SECTIONS: dict[str, Callable[[argparse.Namespace], Table]] = {
    "sample_idx": bench_sample_idx,
    "blending": bench_blending,
    "preprocess": bench_preprocess,
}


def main(argv: list[str] | None = None) -> None:
    """Run the chosen sections and print one table each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--mean-tokens", type=float, default=1000.0, help="mean document length")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--datasets", type=int, default=5, help="datasets in the blend")
    parser.add_argument("--blend-samples", type=int, default=10_000_000)
    parser.add_argument("--loop-fraction", type=float, default=1.0,
                        help="share of the input the Python loop references run on (then scaled)")
    parser.add_argument("--corpus-bytes", type=int, default=20_000_000, help="text for the preprocessing section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.loop_fraction <= 1:
        parser.error("--loop-fraction must be in (0, 1]")
    for name in args.sections:
        print(SECTIONS[name](args).render(), end="\n\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
