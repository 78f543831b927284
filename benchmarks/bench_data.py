"""Data pipeline benchmarks: each section times megagrow's code against a reference in the same run.

    python benchmarks/bench_data.py                      # every section
    python benchmarks/bench_data.py --sections sample_idx --documents 100000

Sections (add one by writing a function `args -> Table` whose first row is the code under
test, its arguments in `main`, and an entry in SECTIONS):
  sample_idx           C++ build_sample_idx vs the loop and vectorised numpy references
  blending             C++ build_blending_indices (megatron-core's and Tijdeman's rule) vs megatron-core's own
                       C++ helper (when megatron-core is installed) and the numpy references
  preprocess           tools/preprocess_data.py on a directory of --corpus-files files: 2 workers vs 1
  preprocess_formats   the same documents as .jsonl, .jsonl.zst, .jsonl.gz and .parquet files
  preprocess_memory    peak memory (PSS of the tool and its workers) for the input and --memory-factor times it
  preprocess_megatron  tools/preprocess_data.py vs Megatron-LM's (--megatron-lm) on one jsonl, same bytes out

The preprocessing sections time whole commands and also a probe run on a few documents;
"start-up excluded" is (tokens - probe tokens) / (time - probe time), which leaves out
interpreter, import, tokenizer and pool start-up for every tool alike.

Times are the best of --repeats runs (the Python loops run once). With
--loop-fraction below 1 the loops run on that share of the samples and their time
is scaled linearly (both are linear scans); the "measured on" column says so. The
blending loops run on at most BLEND_LOOP_SAMPLES samples, scaled the same way.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import gzip
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow
import pyarrow.parquet
import zstandard

from megagrow.data.corpus_inputs import batch_records, find_corpus_files
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
    rows: list[tuple[str, str, float]]  # (implementation, measured on, seconds for the full input, or `unit`)
    notes: list[str] = dataclasses.field(default_factory=list)
    ratio_label: str = "C++ speed-up"  # what "other row's time / first row's time" means here
    unit: str = "ms"  # shown as value * scale
    scale: float = 1e3
    ratio_digits: int = 1

    def render(self) -> str:
        """The table as aligned text, with each row's value relative to the first row."""
        base = self.rows[0][2]
        header = ("implementation", "measured on", self.unit, self.ratio_label)
        body = [(name, on, f"{value * self.scale:.1f}", f"{value / base:.{self.ratio_digits}f}x")
                for name, on, value in self.rows]
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


# ------------------------------------------------------------------------ preprocessing

ROOT = Path(__file__).resolve().parent.parent
PROBE_DOCUMENTS = 20  # documents of the probe run that measures start-up


def _quiet(command: list, env: dict | None = None) -> float:
    """Run a command with its output discarded; seconds of wall time."""
    start = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


class PreprocessCorpus:
    """Real text of this machine (stdlib code and docstrings) and a tokenizer trained on it, written in each
    format and file layout a section asks for, once per benchmark run."""

    def __init__(self, corpus_bytes: int, files: int, seed: int):
        self.root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self.files = files
        _quiet([sys.executable, ROOT / "tools" / "build_corpus.py", "--output-dir", self.root, "--domains", "code",
                "prose", "--max-bytes-per-domain", corpus_bytes // 2, "--seed", seed])
        lines = [line for domain in ("code", "prose")
                 for line in (self.root / f"{domain}.jsonl").read_bytes().splitlines(keepends=True)]
        np.random.default_rng(seed).shuffle(lines)  # code and prose documents interleaved, as in a web crawl
        self.lines = lines
        self.jsonl = self.root / "all.jsonl"
        self.jsonl.write_bytes(b"".join(lines))
        self.probe_jsonl = self.root / "probe.jsonl"
        self.probe_jsonl.write_bytes(b"".join(lines[:PROBE_DOCUMENTS]))
        self._directories: set[Path] = set()
        self.tokenizer = self.root / "tok.model"
        _quiet([sys.executable, ROOT / "tools" / "train_tokenizer.py", "--input", self.jsonl, "--output-prefix",
                self.root / "tok", "--vocab-size", "8000", "--max-sentences", "200000"])

    @functools.cached_property
    def line_documents(self) -> list[bytes]:
        """Every non-blank line of the texts as a document of its own: many short documents, as in chat or web data."""
        texts = (json.loads(line)["text"] for line in self.lines)
        return [json.dumps({"text": t, "source": "line"}).encode() + b"\n"
                for text in texts for t in text.splitlines() if t.strip()]

    def directory(self, kind: str, copies: int = 1, probe: bool = False, per_line: bool = False) -> Path:
        """The documents (or, per_line, the line documents) split into `files` files of one kind (jsonl, zst, gz,
        parquet), `copies` times over."""
        directory = self.root / f"{kind}{'_lines' if per_line else ''}_x{copies}{'_probe' if probe else ''}"
        if directory in self._directories:
            return directory
        self._directories.add(directory)
        directory.mkdir()
        lines = self.line_documents if per_line else self.lines
        lines = lines[:PROBE_DOCUMENTS] if probe else lines
        parts = 1 if probe else self.files
        bounds = np.linspace(0, len(lines), parts + 1).astype(int)
        for copy in range(copies):
            for part in range(parts):
                _write_part(kind, directory / f"c{copy:03d}_part{part:04d}", lines[bounds[part] : bounds[part + 1]])
        return directory


def _write_part(kind: str, stem: Path, lines: list[bytes]) -> None:
    """Write jsonl lines as one file of `kind`, compressed as such corpora usually are."""
    data = b"".join(lines)
    if kind == "jsonl":
        stem.with_suffix(".jsonl").write_bytes(data)
    elif kind == "zst":
        stem.with_suffix(".jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    elif kind == "gz":
        stem.with_suffix(".jsonl.gz").write_bytes(gzip.compress(data, compresslevel=6))
    elif kind == "parquet":
        records = [json.loads(line) for line in lines]
        table = pyarrow.table({"text": [r["text"] for r in records], "source": [r["source"] for r in records]})
        pyarrow.parquet.write_table(table, stem.with_suffix(".parquet"))  # snappy, as pyarrow writes by default
    else:
        raise ValueError(kind)


@functools.cache
def preprocess_corpus(corpus_bytes: int, files: int, seed: int) -> PreprocessCorpus:
    """The corpus shared by the preprocessing sections of one benchmark run."""
    return PreprocessCorpus(corpus_bytes, files, seed)


def preprocess_command(corpus: PreprocessCorpus, inputs: Path, prefix: Path, workers: int) -> list:
    """tools/preprocess_data.py on `inputs`, writing `{prefix}_text_document`."""
    return [sys.executable, ROOT / "tools" / "preprocess_data.py", "--input", inputs, "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer, "--append-eod",
            "--workers", workers]


@dataclasses.dataclass
class Timing:
    """Best wall times of a command on the whole input and on the probe, and the tokens each wrote."""

    full: float
    probe: float
    tokens: int
    probe_tokens: int
    repeats: list[float]  # start-up-excluded seconds of each repeat (its whole run minus its probe run)

    @property
    def startup_excluded(self) -> float:
        """Seconds of the whole run minus the probe run's: the time spent on the documents themselves."""
        return self.full - self.probe

    @property
    def tokens_per_second(self) -> float:
        """Throughput with start-up excluded."""
        return (self.tokens - self.probe_tokens) / self.startup_excluded


def time_commands(commands: dict[str, tuple[list, list, Path, Path, dict | None]], repeats: int) -> dict[str, Timing]:
    """Best of `repeats` runs of each (full command, probe command, full prefix, probe prefix, env), interleaved
    so that a change of machine load hits every command alike."""
    full = {name: math.inf for name in commands}
    probe = dict(full)
    each: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (full_command, probe_command, _, _, env) in commands.items():
            full_seconds, probe_seconds = _quiet(full_command, env), _quiet(probe_command, env)
            full[name], probe[name] = min(full[name], full_seconds), min(probe[name], probe_seconds)
            each[name].append(full_seconds - probe_seconds)
    return {name: Timing(full[name], probe[name], IndexedDataset(f"{prefix}_text_document").num_tokens,
                         IndexedDataset(f"{probe_prefix}_text_document").num_tokens, each[name])
            for name, (_, _, prefix, probe_prefix, _) in commands.items()}


def same_outputs(prefixes: list[Path]) -> None:
    """Raise unless every `{prefix}_text_document` pair holds the same bytes."""
    first = prefixes[0]
    for prefix in prefixes[1:]:
        for suffix in (".bin", ".idx"):
            if Path(f"{first}_text_document{suffix}").read_bytes() != Path(f"{prefix}_text_document{suffix}").read_bytes():
                raise AssertionError(f"{prefix}_text_document{suffix} differs from {first}'s")


def throughput_table(title: str, timings: dict[str, Timing], ratio_label: str, notes: Sequence[str] = ()) -> Table:
    """A row per command with its start-up-excluded time, and notes with its whole-command and probe times."""
    first = next(iter(timings.values()))
    whole = [f"{name}: whole command {t.full:.2f} s ({t.tokens / t.full:,.0f} tokens/s; "
             f"{t.full / first.full:.2f}x the first's time), probe run (start-up) {t.probe:.2f} s"
             for name, t in timings.items()]
    for name, t in list(timings.items())[1:]:  # repeats run back to back share the machine's load of the moment
        ratios = [other / mine for other, mine in zip(t.repeats, first.repeats)]
        whole.append(f"{name}: start-up-excluded time / the first's, repeat by repeat: "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f})")
    return Table(
        title=f"{title} (start-up excluded)",
        rows=[(f"{name} ({t.tokens_per_second:,.0f} tokens/s)", "start-up excluded", t.startup_excluded)
              for name, t in timings.items()],
        notes=[*whole, *notes],
        ratio_label=ratio_label,
        ratio_digits=2,
    )


def _children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def workers_busy(command: list) -> float:
    """Mean share of their lifetime the command's worker processes spent running or waiting for a CPU.

    From /proc/PID/schedstat (time on a CPU, time runnable in a queue): what is left is
    time blocked, waiting for work. Near 100% means the pipeline kept every worker fed,
    and a speed-up short of the worker count comes from CPUs shared with other jobs.
    """
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, tuple[float, float, int]] = {}  # pid -> (first seen, last seen, busy ns at last seen)
    while process.poll() is None:
        for child in _children(process.pid):
            try:
                with open(f"/proc/{child}/schedstat") as f:
                    on_cpu, waiting, _ = map(int, f.read().split())
            except (OSError, ValueError):
                continue
            now = time.perf_counter()
            seen[child] = (seen.get(child, (now,))[0], now, on_cpu + waiting)
        time.sleep(0.02)
    shares = [busy / 1e9 / (last - first) for first, last, busy in seen.values() if last - first > 0.5]
    return float(np.mean(shares)) if shares else math.nan


def bench_preprocess(args: argparse.Namespace) -> Table:
    """tools/preprocess_data.py on a directory of many jsonl files: 2 workers against 1."""
    corpus = preprocess_corpus(args.corpus_bytes, args.corpus_files, args.seed)
    load = _load()
    directory, probe = corpus.directory("jsonl"), corpus.directory("jsonl", probe=True)
    out = corpus.root / "out_workers"
    commands = {f"--workers {w}": (preprocess_command(corpus, directory, out / f"w{w}", w),
                                   preprocess_command(corpus, probe, out / f"w{w}_probe", w),
                                   out / f"w{w}", out / f"w{w}_probe", None) for w in (2, 1)}
    timings = time_commands(commands, args.repeats)
    same_outputs([out / "w2", out / "w1"])
    busy = [f"{name}: workers running or waiting for a CPU {workers_busy(full):.0%} of their lifetime "
            f"(the rest waiting for work)" for name, (full, *_) in commands.items()]
    tokens = timings["--workers 2"].tokens
    return throughput_table(f"preprocess_data.py: {args.corpus_files} jsonl files, {os.path.getsize(corpus.jsonl) / 1e6:.0f} "
                            f"MB of stdlib code and docstrings, {tokens:,} tokens, 2 workers vs 1", timings,
                            "2-worker speed-up", notes=[*busy, f"load average {load} at the start, {_load()} at the end"])


def reading_time(directory: Path) -> float:
    """Best of 3 times to read every file of `directory` into worker batches, in this process: the format's own cost."""
    files = find_corpus_files([directory])

    def read():
        for _ in batch_records(files, ["text"], 1024, 1 << 17):
            pass

    return best_time(read, 3)


def _load() -> str:
    """The 1-minute load average now."""
    return f"{os.getloadavg()[0]:.1f}"


def bench_preprocess_formats(args: argparse.Namespace) -> Table:
    """The same documents as .jsonl, .jsonl.zst, .jsonl.gz and .parquet files, 2 workers."""
    corpus = preprocess_corpus(args.corpus_bytes, args.corpus_files, args.seed)
    load = _load()
    out = corpus.root / "out_formats"
    kinds = {"jsonl": ".jsonl", "zst": ".jsonl.zst", "gz": ".jsonl.gz", "parquet": ".parquet"}
    commands = {suffix: (preprocess_command(corpus, corpus.directory(kind), out / kind, 2),
                         preprocess_command(corpus, corpus.directory(kind, probe=True), out / f"{kind}_probe", 2),
                         out / kind, out / f"{kind}_probe", None) for kind, suffix in kinds.items()}
    timings = time_commands(commands, args.repeats)
    same_outputs([out / kind for kind in kinds])
    sizes = [f"{suffix}: {sum(f.stat().st_size for f in corpus.directory(kind).iterdir()) / 1e6:.1f} MB on disk, "
             f"read and batched alone (main process, no tokenizing) in {reading_time(corpus.directory(kind)) * 1e3:.0f} ms"
             for kind, suffix in kinds.items()]
    return throughput_table(f"preprocess_data.py: the same {args.corpus_files} files in each format, 2 workers",
                            timings, "time / .jsonl's", notes=[*sizes, f"load average {load} at the start, {_load()} at the end"])


def _tree_pss(pid: int) -> int:
    """Proportional set size, in bytes, of a process and all its descendants (Linux /proc)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as f:
                pending += [int(child) for child in f.read().split()]
        except (OSError, ValueError):  # exited while being read
            continue
    return total


def memory_samples(command: list) -> list[tuple[float, int]]:
    """(seconds since start, PSS of the command's process tree) every 20 ms while it runs."""
    start = time.perf_counter()
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    while process.poll() is None:
        samples.append((time.perf_counter() - start, _tree_pss(process.pid)))
        time.sleep(0.02)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return samples + [(time.perf_counter() - start, 0)]


def bench_preprocess_memory(args: argparse.Namespace) -> Table:
    """Peak memory of tools/preprocess_data.py (main process and workers) on inputs of 1 and --memory-factor times the
    corpus: its documents (a few thousand, long), and its lines as documents (hundreds of thousands, short)."""
    corpus = preprocess_corpus(args.corpus_bytes, args.corpus_files, args.seed)
    out = corpus.root / "out_memory"
    rows, notes = [], [f"load average {_load()} at the start"]
    for per_line in (True, False):
        for copies in (1, args.memory_factor):
            directory = corpus.directory("zst", copies=copies, per_line=per_line)
            prefix = out / f"{'lines' if per_line else 'docs'}_x{copies}"
            samples = memory_samples(preprocess_command(corpus, directory, prefix, 2))
            seconds, peak = samples[-1][0], max(pss for _, pss in samples)
            dataset = IndexedDataset(f"{prefix}_text_document")
            files = len(list(directory.iterdir()))
            kind = "line documents" if per_line else "documents"
            rows.append((f"{copies}x input: {files:,} .jsonl.zst files, {dataset.num_documents:,} {kind}",
                         "peak PSS, tool + 2 workers", float(peak)))
            # Flat fifths mean a bound reached early (workers' heaps settle after the longest documents), not growth.
            fifths = [max([pss for t, pss in samples if k / 5 <= t / seconds < (k + 1) / 5] or [0]) for k in range(5)]
            notes.append(f"{copies}x {kind}: {dataset.num_tokens:,} tokens in {seconds:.1f} s; peak in each fifth of "
                         f"the run: {', '.join(f'{p / 2**20:.1f}' for p in fifths)} MiB")
    return Table(title="preprocess_data.py peak memory against input size", rows=rows, notes=notes,
                 ratio_label="peak / first row's", unit="MiB", scale=1 / 2**20, ratio_digits=2)


def bench_preprocess_megatron(args: argparse.Namespace) -> Table:
    """tools/preprocess_data.py against Megatron-LM's on the same jsonl, tokenizer and workers; outputs must match."""
    corpus = preprocess_corpus(args.corpus_bytes, args.corpus_files, args.seed)
    load = _load()
    out = corpus.root / "out_megatron"
    # The corpus --megatron-factor times over: Megatron-LM's start-up (~6 s of imports, varying by a second
    # or more on a shared machine) must be small against the tokenizing it is subtracted from.
    jsonl = corpus.root / f"all_x{args.megatron_factor}.jsonl"
    with open(jsonl, "wb") as f:
        for _ in range(args.megatron_factor):
            f.write(corpus.jsonl.read_bytes())
    commands = {"megagrow": (preprocess_command(corpus, jsonl, out / "megagrow", 2),
                             preprocess_command(corpus, corpus.probe_jsonl, out / "megagrow_probe", 2),
                             out / "megagrow", out / "megagrow_probe", None)}
    if args.megatron_lm:
        tool = args.megatron_lm / "tools" / "preprocess_data.py"
        env = dict(os.environ, PYTHONPATH=str(args.megatron_lm))

        def megatron(inputs: Path, prefix: Path) -> list:
            return [sys.executable, tool, "--input", inputs, "--output-prefix", prefix, "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer, "--append-eod", "--workers", 2]

        commands["Megatron-LM"] = (megatron(jsonl, out / "megatron"), megatron(corpus.probe_jsonl, out / "megatron_probe"),
                                   out / "megatron", out / "megatron_probe", env)
    timings = time_commands(commands, args.repeats)
    notes = []
    if args.megatron_lm:
        same_outputs([out / "megagrow", out / "megatron"])
        notes.append("outputs byte-identical (.bin and .idx)")
    else:
        notes.append("Megatron-LM not measured: pass --megatron-lm DIR")
    notes.append(f"load average {load} at the start, {_load()} at the end")
    return throughput_table(f"preprocess_data.py vs Megatron-LM's: one {jsonl.stat().st_size / 1e6:.0f} MB "
                            f"jsonl, {timings['megagrow'].tokens:,} tokens, 2 workers each", timings,
                            "time / megagrow's", notes=notes)


SECTIONS: dict[str, Callable[[argparse.Namespace], Table]] = {
    "sample_idx": bench_sample_idx,
    "blending": bench_blending,
    "preprocess": bench_preprocess,
    "preprocess_formats": bench_preprocess_formats,
    "preprocess_memory": bench_preprocess_memory,
    "preprocess_megatron": bench_preprocess_megatron,
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
    parser.add_argument("--corpus-bytes", type=int, default=20_000_000, help="text for the preprocessing sections")
    parser.add_argument("--corpus-files", type=int, default=240, help="files the preprocessing corpus is split into")
    parser.add_argument("--memory-factor", type=int, default=10, help="preprocess_memory: input this many times larger")
    parser.add_argument("--megatron-factor", type=int, default=10,
                        help="preprocess_megatron: the jsonl holds the corpus this many times over")
    parser.add_argument("--megatron-lm", type=Path,
                        help="preprocess_megatron: a Megatron-LM tree holding tools/preprocess_data.py, importable "
                             "with PYTHONPATH set to it (see benchmarks/RESULTS.md for the one measured)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.loop_fraction <= 1:
        parser.error("--loop-fraction must be in (0, 1]")
    for name in args.sections:
        print(SECTIONS[name](args).render(), end="\n\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
