"""In-run growth (`--grow-at-tokens`) against the offline route (save, tools/stack_checkpoint.py, relaunch), on 2 processes.

    python benchmarks/bench_growth.py                          # 16 layers, hidden 1024: a 1.0 GB base, 1.8 GB grown
    python benchmarks/bench_growth.py --append-to benchmarks/RESULTS.md

One torchrun job of 2 processes (pipeline stages) trains the base one iteration on --mock-data,
grows it x2 with --stack-optimizer-state on every rank and trains the grown model one iteration.
Rank 0 logs how long growing took (building its grown stage, then saving it). Both workers'
anonymous memory (RssAnon: heap, not the reclaimable pages of memory-mapped checkpoints) is
sampled every 20 ms from outside, and split into the base phase, the growth (from its first
log line to the one that says the grown stage is built and saved) and the grown phase. The
offline route is timed on the base that job saved: the stacking tool (its peak memory too),
then a relaunch that only loads the grown checkpoint. Ratios are in-run over offline, in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROWN_LINE = re.compile(r"grown stage built in ([\d.]+) s and saved in ([\d.]+) s; peak memory of this rank so far "
                        r"([\d.]+) GB")


def _model_flags(args) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.ffn),
            "--num-attention-heads", "16", "--vocab-size", str(args.vocab), "--seq-length", str(args.seq),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-4", "--mock-data",
            "--eval-interval", "0", "--log-interval", "1", "--pipeline-model-parallel-size", "2"]


def _torchrun(flags: list[str], cwd: Path) -> tuple[str, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), str(ROOT / "pretrain_gpt.py"), *flags]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"pretrain_gpt.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr, time.perf_counter() - start


def _workers(parent: int) -> list[int]:
    """The pretrain_gpt.py processes torchrun started (children of `parent` running it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
            if ppid == parent and b"pretrain_gpt.py" in cmdline:
                found.append(int(entry.name))
    return sorted(found)


def _anon_mb(pid: int) -> float:
    try:
        return int(re.search(r"RssAnon:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return 0.0


def _in_run_job(flags: list[str], cwd: Path) -> tuple[str, float, dict[str, list[float]]]:
    """(log, wall seconds, {phase: [peak anonymous MB of each worker]}) of the in-run growth job."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), str(ROOT / "pretrain_gpt.py"), *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    phase, peaks, done = ["base"], {"base": {}, "growth": {}, "grown": {}}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in _workers(process.pid):
                current = peaks[phase[0]]
                current[pid] = max(current.get(pid, 0.0), _anon_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "growing at iteration" in line:
            phase[0] = "growth"
        elif "grown stage built in" in line:
            phase[0] = "grown"
    process.wait()
    done.set()
    sampler.join()
    log = "".join(lines)
    if process.returncode:
        raise SystemExit(f"pretrain_gpt.py failed:\n{log[-3000:]}")
    return log, time.perf_counter() - start, {name: [v for _, v in sorted(p.items())] for name, p in peaks.items()}


def main() -> None:
    """Run both routes and print (optionally append) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--append-to", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_growth_"))
    tokens_per_iteration = 2 * args.seq
    try:
        model = _model_flags(args)
        log, in_run_wall, anon = _in_run_job([*model, "--train-iters", "2", "--grow-at-tokens",
                                              str(tokens_per_iteration), "--growth-factor", "2",
                                              "--stack-optimizer-state", "--save", str(work / "run"), "--load",
                                              str(work / "run")], work)
        built_s, saved_s, _ = map(float, GROWN_LINE.search(log).groups())

        start = time.perf_counter()
        tool = subprocess.run([sys.executable, "-c", "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                               "runpy.run_path(sys.argv[0], run_name='__main__'); "
                               "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
                               "tools/stack_checkpoint.py", "--load", str(work / "run"), "--save",
                               str(work / "offline"), "--iteration", "1", "--growth-factor", "2",
                               "--stack-optimizer-state", "--no-progress-bar"],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        tool_s = time.perf_counter() - start
        if tool.returncode:
            raise SystemExit(f"stack_checkpoint failed:\n{tool.stderr[-3000:]}")
        tool_peak = int(tool.stdout.split("peak")[-1]) / 1024  # MB (resident, file-backed pages included)
        grown_flags = [*model, "--num-layers", str(2 * args.layers), "--train-iters", "1", "--load",
                       str(work / "offline"), "--lr-decay-iters", "2"]
        _, reload_s = _torchrun(grown_flags, work)
        base_gb = sum(f.stat().st_size for f in (work / "run" / "iter_0000001").rglob("*.pt")) / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [("in-run growth on every rank (build grown stage + save it)", built_s + saved_s),
            ("offline: stack_checkpoint.py + relaunch that loads the grown checkpoint", tool_s + reload_s),
            ("  of which stack_checkpoint.py", tool_s), ("  of which the relaunch (start-up included)", reload_s)]
    command = "python benchmarks/bench_growth.py " + " ".join(sys.argv[1:])
    lines = [f"## In-run growth vs the offline route (benchmarks/bench_growth.py) — {datetime.date.today()}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end; command: `{command}`.",
             f"Base: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, fp32, pp=2 on 2 "
             f"processes, saved with its Adam state: {base_gb:.2f} GB of shard files. Grown x2 (G_stack) with the "
             f"stacked Adam state. In-run wall time of the whole job: {in_run_wall:.0f} s.", "",
             "| route | seconds | in-run / this |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {(built_s + saved_s) / max(seconds, 1e-9):.2f} |" for name, seconds in rows]
    def ranks(values: list[float]) -> str:
        return " / ".join(f"{v:.0f}" for v in values)

    lines += ["", "| peak anonymous memory (MB) | rank 0 / rank 1 |", "|---|---|",
              f"| base phase (training iteration 1, saving the base) | {ranks(anon['base'])} |",
              f"| growth (building the grown stage, saving it) | {ranks(anon['growth'])} |",
              f"| grown phase (training iteration 2): the grown run's own | {ranks(anon['grown'])} |",
              f"| offline stack_checkpoint.py (one process, whole model; peak RSS) | {tool_peak:.0f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps({"growth_s": built_s + saved_s, "offline_s": tool_s + reload_s}))
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
