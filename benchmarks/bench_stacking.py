"""Peak resident memory of tools/stack_checkpoint.py against the sizes of the checkpoints it reads and writes.

    python benchmarks/bench_stacking.py                      # ~670 MB base, x2, into pp=4 and pp=1
    python benchmarks/bench_stacking.py --base megatron-torch_dist --layers 16   # 1.1 GB, saved by megatron-core
    python benchmarks/bench_stacking.py --append-to benchmarks/RESULTS.md

A base checkpoint of random weights (default: hidden 1024, 8 layers, vocab 32000, fp32, tp=1
pp=2) is written by a separate process — by megagrow, or (`--base megatron-torch|megatron-torch_dist`)
by megatron-core's GPTModel and dist_checkpointing as Megatron-LM lays it out, tp=1 pp=1, so
reading Megatron-LM's own files is measured (megatron-core must be installed); then each target layout is grown by the CLI in its
own process, whose peak RSS (its own getrusage ru_maxrss: anonymous memory plus touched
pages of the memory-mapped base shards) is compared with the base checkpoint, the grown
checkpoint and its largest shard, and with one grown layer and the embedding (the largest
groups the streaming writer holds). Children that only import the tool, and that also start
the FakeTensorMode the writer builds skeletons with (it imports torch._dynamo), give the
fixed costs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2
BASES = ("megagrow", "megatron-torch", "megatron-torch_dist")
BASE_DESCRIPTIONS = {"megagrow": "written by megagrow, tp=1 pp=2",
                     "megatron-torch": "written by megatron-core 0.16.1 as Megatron-LM's torch format, tp=1 pp=1",
                     "megatron-torch_dist": "written by megatron-core 0.16.1's dist_checkpointing (torch_dist), "
                                            "tp=1 pp=1"}
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "1000000"}

_WRITE_BASE = """
import sys, torch
from megagrow.checkpoint.reader import group_keys, group_param_names
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded
from megagrow.checkpoint.tp_layout import full_shape
from megagrow.config import ModelConfig
config = ModelConfig(num_layers={layers}, hidden_size={hidden}, ffn_hidden_size={ffn}, num_attention_heads=16,
                     vocab_size={vocab}, seq_length=256)
state = {{name: torch.randn(full_shape(name, config)) * 0.02
         for group in group_keys(config) for name in group_param_names(group, config)}}
save_sharded(sys.argv[1], 100, config, reader_from_state_dict(state, config), tp=1, pp=2, progress=False)
"""


# megatron-core's model, saved the way Megatron-LM does (tests/megatron_core_harness.py holds the CPU shims).
_WRITE_MEGATRON_BASE = """
import sys, torch
sys.path.insert(0, "tests")
import megatron_core_harness as mc
from megagrow.config import ModelConfig
def main():
    config = ModelConfig(num_layers={layers}, hidden_size={hidden}, ffn_hidden_size={ffn}, num_attention_heads=16,
                         vocab_size={vocab}, seq_length=256)
    with mc.single_process_group({port}):
        torch.manual_seed(0)
        model = mc.stage_model(config, 1, 1, 0)
        args = mc.megatron_lm_args(config, 1, 1, iteration=100, consumed_train_samples=0, global_batch_size=8,
                                   ckpt_format="{ckpt_format}")
        mc.save_like_megatron_lm(model, sys.argv[1], args=args, iteration=100, tp_rank=0, pp_rank=0, pp=1,
                                 ckpt_format="{ckpt_format}")
if __name__ == "__main__":
    main()
"""


# Runs a script (or a bare import) and prints, last, its own peak RSS and the peaks of its
# anonymous (heap) and file-backed (memory-mapped checkpoint pages) parts, sampled every 10 ms.
_MEASURE = """
import resource, runpy, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            name, _, value = line.partition(":")
            if name in peaks:
                peaks[name] = max(peaks[name], int(value.split()[0]))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
if sys.argv[1:] and sys.argv[1] != "--fake-tensor-mode":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    import torch, megagrow.growth.stacking
    if sys.argv[1:]:
        from torch._subclasses.fake_tensor import FakeTensorMode
        FakeTensorMode()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peaks["RssAnon"], peaks["RssFile"])
"""


def _peak_rss_mb(argv: list[str], env: dict[str, str] | None = None) -> tuple[list[float], float]:
    """([peak RSS, peak anonymous, peak file-backed] in MB, wall seconds) of a child running `argv` ([]: imports;
    ["--fake-tensor-mode"]: imports and a FakeTensorMode)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, *argv], check=True, cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})
    return [int(kb) / 1024 for kb in result.stdout.split()[-3:]], time.perf_counter() - start


def _checkpoint_files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file() and f.suffix in (".pt", ".distcp")]


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in _checkpoint_files(path)) / MB


def _largest_shard_mb(path: Path) -> float:
    return max(f.stat().st_size for f in _checkpoint_files(path)) / MB


def _group_mb(layers: int, hidden: int, ffn: int, vocab: int) -> tuple[float, float]:
    """(one layer, the embedding) of the bench model in MB, fp32."""
    from megagrow.checkpoint.reader import group_param_names
    from megagrow.checkpoint.tp_layout import full_shape
    from megagrow.config import ModelConfig

    config = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=16,
                         vocab_size=vocab, seq_length=256)

    def mb(group) -> float:
        return sum(4 * math.prod(full_shape(name, config)) for name in group_param_names(group, config)) / MB

    return mb(0), mb("embedding")


def main() -> None:
    """Write the base, grow it into each target layout, print (and optionally append) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["1x4", "1x1"], help="target layouts TxP")
    parser.add_argument("--base", choices=BASES, default="megagrow",
                        help="who writes the base: megagrow (tp=1 pp=2) or megatron-core as Megatron-LM (tp=1 pp=1)")
    parser.add_argument("--append-to", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_stacking_"))
    try:
        base = work / "base"
        shape = dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab)
        if args.base == "megagrow":
            script = _WRITE_BASE.format(**shape)
        else:
            script = _WRITE_MEGATRON_BASE.format(**shape, port=29000 + os.getpid() % 1000,
                                                 ckpt_format=args.base.removeprefix("megatron-"))
        subprocess.run([sys.executable, "-c", script, str(base)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows = []
        (import_peak, import_anon, _), _ = _peak_rss_mb([])
        (fake_peak, fake_anon, _), _ = _peak_rss_mb(["--fake-tensor-mode"])
        for target in args.targets:
            tp, pp = target.split("x")
            # glibc raises its mmap threshold as large blocks are freed, then keeps freed layer-sized
            # blocks in the heap; a fixed threshold shows the peak without that retention.
            for env in (None, FIXED_MMAP_THRESHOLD):
                grown = work / f"grown_{target}"
                peak, seconds = _peak_rss_mb([
                    "tools/stack_checkpoint.py", "--load", str(base), "--save", str(grown),
                    "--growth-factor", str(args.factor), "--target-tensor-parallel-size", tp,
                    "--target-pipeline-parallel-size", pp, "--vocab-size", str(args.vocab), "--no-progress-bar"], env)
                allocator = "".join(f", {name}={value}" for name, value in (env or {}).items())
                rows.append((f"tp={tp} pp={pp}{allocator}", *peak, _size_mb(grown), _largest_shard_mb(grown),
                             seconds))
                shutil.rmtree(grown)
        base_mb = _size_mb(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    layer_mb, embedding_mb = _group_mb(args.layers, args.hidden, args.ffn, args.vocab)
    command = "python benchmarks/bench_stacking.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Stacking memory (tools/stack_checkpoint.py) — {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; command: `{command}`.",
        (f"Base: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, fp32, "
         f"{BASE_DESCRIPTIONS[args.base]}: {base_mb:.0f} MB on disk. Grown x{args.factor} (depth:stack). Peak RSS of the tool's process "
         f"(ru_maxrss) and the sampled peaks of its anonymous and file-backed (memory-mapped checkpoint pages, "
         f"reclaimable) parts; Python + torch + imports alone: {import_peak:.0f} MB RSS, {import_anon:.0f} MB "
         f"anonymous; with the writer's FakeTensorMode (imports torch._dynamo): {fake_peak:.0f} MB RSS, "
         f"{fake_anon:.0f} MB anonymous. One grown layer: {layer_mb:.0f} MB; the embedding: {embedding_mb:.0f} MB."),
        "",
        ("| target | peak RSS (MB) | peak anonymous (MB) | peak file-backed (MB) | grown checkpoint (MB) "
         "| largest target shard (MB) | base checkpoint (MB) | wall (s) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, peak, anon, file_backed, grown_mb, shard_mb, seconds in rows:
        lines.append(f"| {target} | {peak:.0f} | {anon:.0f} | {file_backed:.0f} | {grown_mb:.0f} | {shard_mb:.0f} | "
                     f"{base_mb:.0f} | {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
