"""README's first command, shortened: the whole CPU pipeline runs end to end and leaves every output."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "qs"
    env = dict(os.environ, OUT=str(out), BYTES_PER_DOMAIN="150000", VOCAB_SIZE="1000", ITERS="8", GROW_AT="4",
               EVAL_INTERVAL="2", SEEDS="2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart_cpu.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    for step in range(1, 9):
        assert f"== {step}/8 " in stdout

    # 4: the entropy mixture is what every run trained on
    mixture = [line.split() for line in (out / "mixture.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(mixture) >= 2 and sum(float(w) for w, _ in mixture) == pytest.approx(1.0, abs=1e-5)
    # 5-6: the base stopped at the growth point in its pipeline layout; the grown run resumed there in tp=2
    assert (out / "base" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (out / "base" / "checkpoints" / "iter_0000004" / "mp_rank_00_001").is_dir()
    grown = out / "grown" / "checkpoints"
    assert (grown / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert (grown / "iter_0000008" / "mp_rank_01").is_dir()
    grown_steps = [json.loads(line)["step"] for line in (out / "grown" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "train"]
    assert grown_steps and min(grown_steps) > 4 and max(grown_steps) == 8
    # 7: exported and loaded by transformers
    assert json.loads((out / "hf" / "config.json").read_text())["num_hidden_layers"] == 4
    assert "loaded " in stdout and "with transformers (LlamaForCausalLM, 4 layers" in stdout
    assert "continuation (" in stdout
    # 8: the report
    summary = (out / "summary.md").read_text()
    assert "base: 2 layers, pp=2" in summary and "grown x2: 4 layers, tp=2" in summary and "scratch" in summary
    assert "training FLOPs at its end" in summary and "scratch's final validation loss" in summary
    # SEEDS=2: a second grown/scratch pair (growth inside the run) and how the comparison moves between seeds
    second_grown = out / "grown_seed1235" / "checkpoints" / "grown"
    assert (second_grown / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert "Over 2 seeds (a grown and a scratch run each)" in summary
    assert (out / "loss_vs_tokens_and_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
