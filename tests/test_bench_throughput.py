"""benchmarks/bench_throughput.py runs end to end on the CPU with the tiny preset and prints its table."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_smoke_run_prints_the_comparison_table():
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_throughput.py"), "--model-preset", "tiny",
               "--device", "cpu", "--iters", "3", "--warmup", "1"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert "tokens/s" in rows["setup"] and "vs all on" in rows["setup"]
    assert rows["all on"].rstrip().endswith("1.00x |")
    assert {"flash-attn off", "fused RMSNorm off", "fused AdamW off", "chunked cross entropy off", "all off"} < rows.keys()
    # torch.compile stays off on the CPU unless asked for, and no kernel claims to be fused here.
    assert "torch.compile SwiGLU off" not in rows
    assert "flash-attn" not in rows["all on"].split("|")[2] and "chunked" in rows["all on"]


def test_refuses_cuda_without_a_gpu():
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_throughput.py"), "--device", "cuda"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device cuda but torch sees no GPU; pass --device cpu"]
