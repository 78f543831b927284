"""benchmarks/bench_model.py runs end to end on a tiny model and prints its table, losses and Amdahl bound."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "96", "--vocab", "512",
        "--seq", "32", "--batch", "2", "--warmup", "2", "--rounds", "2", "--matmul-size", "256", "--profile-steps", "1"]


def _run(*flags):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_model.py"), *TINY, *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    return result.stdout, rows


def _first_losses(stdout):
    line = next(line for line in stdout.splitlines() if "first-step losses" in line)
    return [float(value) for value in re.findall(r"(\d+\.\d{6}) \(", line)]


def test_prints_the_comparison_and_the_amdahl_bound():
    stdout, rows = _run()
    assert "tokens/s" in rows["implementation"] and "MFU vs matmul" in rows["implementation"]
    assert rows["HF LlamaForCausalLM (sdpa)"].rstrip().endswith("1.00x |")
    assert "megagrow LlamaModel" in rows
    losses = _first_losses(stdout)
    assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4  # same weights, same batch
    assert re.search(r"megagrow GEMM \d+% \+ SDPA \d+% = \d+% of its step \(\d+ ms\); HF GEMM", stdout)
    assert re.search(r"Amdahl bound: .* would take \d+ ms, at most \d+\.\d\dx HF; the 1\.3x goal is (within|out of) "
                     r"reach", stdout)
    assert "torch.compile" not in stdout


@pytest.mark.slow  # inductor compiles both models: tens of seconds on 2 cores
def test_compile_adds_a_compiled_row_per_model():
    stdout, rows = _run("--compile")
    assert {"megagrow LlamaModel, torch.compile", "HF LlamaForCausalLM (sdpa), torch.compile"} < rows.keys()
    assert rows["HF LlamaForCausalLM (sdpa), torch.compile"].rstrip().endswith("1.00x |")
    losses = _first_losses(stdout)
    assert len(losses) == 4 and max(losses) - min(losses) < 1e-4
    assert "torch.compile rows: speed-up against compiled HF" in stdout
