"""README's first command, shortened: the CPU quickstart runs end to end and trains."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_end_to_end(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "qs"), BYTES_PER_DOMAIN="150000", VOCAB_SIZE="1000", ITERS="6",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart_cpu.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training loss" in result.stdout and "over 6 iterations" in result.stdout
    run = tmp_path / "qs" / "pretrain_tiny"
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (tmp_path / "qs" / "data" / "code_text_document.idx").is_file()
