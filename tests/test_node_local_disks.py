"""A job whose nodes see only their own disks: two "nodes" (torchrun --nnodes 2 on this machine, each with its own
--save directory) save, grow in the run and resume, each from its own files."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from data_factory import random_documents, write_dataset
from distributed_harness import free_port

from megagrow.checkpoint.layout import load_shard, read_tracker
from megagrow.checkpoint.reader import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]


def _launch_two_nodes(tmp_path: Path, data: str, iters: int) -> list[subprocess.CompletedProcess]:
    port = free_port()
    flags = ["--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data,
             "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
             "--lr", "3e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "4", "--log-interval", "1",
             "--eval-interval", "0", "--grow-at-tokens", str(2 * 4 * 16), "--growth-factor", "2",
             "--stack-optimizer-state"]
    nodes = []
    for node in (0, 1):
        disk = tmp_path / f"node{node}"  # what only this node sees
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                   str(ROOT / "pretrain_gpt.py"), *flags, "--save", str(disk), "--load", str(disk),
                   "--metrics-file", str(disk / "metrics.jsonl")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read(), "") for p in nodes]


def test_nodes_with_local_disks_grow_and_resume_from_their_own_copies(tmp_path):
    data = write_dataset(tmp_path / "docs", random_documents(3, 300, 60))
    for result in _launch_two_nodes(tmp_path, data, 4):
        assert result.returncode == 0, result.stdout[-3000:]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # Each node published the base (iteration 2) and the grown run (2: at growth, 4: at the end) on its own disk.
    for disk in (node0, node1):
        assert read_tracker(disk) == 2 and read_tracker(disk / "grown") == 4
    # The two data-parallel replicas continued from identical grown weights and stacked Adam state.
    first, second = (load_shard(disk / "grown", iteration=2)["megagrow"]["optimizer"]["params"] for disk in (node0, node1))
    weights = [CheckpointReader(disk / "grown", iteration=2).state_dict() for disk in (node0, node1)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert all(torch.equal(first[n]["exp_avg_sq"], second[n]["exp_avg_sq"]) for n in first)
    assert CheckpointReader(node1 / "grown").config.num_layers == 4

    # Relaunched, each node resumes from its own files alone.
    for result in _launch_two_nodes(tmp_path, data, 5):
        assert result.returncode == 0, result.stdout[-3000:]
        assert "iteration 5/5" in result.stdout or result.args[result.args.index("--node-rank") + 1] == "1"
    assert read_tracker(node0 / "grown") == 5 and read_tracker(node1 / "grown") == 5
