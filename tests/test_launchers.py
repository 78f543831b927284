"""pretrain_gpt.py starts under torchrun and under the deepspeed launcher (2 CPU processes)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model-preset", "tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "3", "--log-interval", "1", "--eval-interval", "0", "--pipeline-model-parallel-size", "2"]


def _run(launcher, tmp_path, env_extra=None, extra=()):
    metrics = tmp_path / "metrics.jsonl"
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([*launcher, os.path.join(ROOT, "pretrain_gpt.py"), *FLAGS, *extra, "--metrics-file",
                             str(metrics)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_torchrun(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"], tmp_path)


def test_deepspeed_launcher(tmp_path):
    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not installed beside this Python")
    # README's CPU command for the DeepSpeed path: the launcher, 2 processes, gloo, ZeRO-1 over the pipeline.
    _run([launcher, "--num_gpus", "2"], tmp_path, {"DS_ACCELERATOR": "cpu"}, ["--deepspeed", "--zero-stage", "1"])
