"""Faults injected into 2-process jobs under torchrun (gloo, CPU): a killed worker is recovered from on the
first restart with the uninterrupted run's losses; a stuck worker ends the job after the collective
timeout; a rank's error is the job's only line (issue 14, items 2 and 3)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_factory import random_documents, write_dataset
from distributed_harness import free_port, run_distributed
from megagrow.checkpoint.layout import read_tracker
from megagrow.training.metrics import read_metrics
from trainer_runs import train_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 60


def _flags(data_prefix, extra=()):
    return ["--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data_prefix,
            "--split", "1,0,0", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0", *extra]


def _torchrun(flags, log_path, cwd, rendezvous="static", max_restarts=0):
    port = free_port()
    if rendezvous == "static":
        launch = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        launch = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fault-test"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), *launch, os.path.join(ROOT, "pretrain_gpt.py"), *flags]
    log = open(log_path, "w")
    job = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    _started.append(job)
    return job


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_jobs_left_running():
    """A failed assertion must not leave a launcher and its workers behind: end this test's own session."""
    yield
    while _started:
        job = _started.pop()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _worker_pids(launcher_pid) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (read from their environment)."""
    workers = {}
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        try:
            children = open(f"/proc/{launcher_pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            ranks = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
            if ranks:
                workers[int(ranks[0])] = pid
    return workers


def _wait_until(condition, process, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the job ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def _losses_by_step(metrics_path) -> dict[int, float]:
    """Each iteration's loss; after a restart the resumed run's record of an iteration replaces the killed one's."""
    return {record["step"]: record["loss"] for record in read_metrics(metrics_path, "train")}


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "docs", random_documents(5, 400, 60))


@pytest.fixture(scope="module")
def uninterrupted(data_prefix, tmp_path_factory):
    metrics = tmp_path_factory.mktemp("reference") / "metrics.jsonl"
    return run_distributed(train_losses, 2, _flags(data_prefix, ["--metrics-file", str(metrics)]), 2)[0]


@pytest.mark.parametrize("rendezvous, victim", [("static", 1), ("c10d", 0)])
def test_killed_worker_is_recovered_on_the_first_restart(uninterrupted, data_prefix, tmp_path, rendezvous, victim):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    flags = _flags(data_prefix, ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "5",
                                 "--metrics-file", str(metrics)])
    job = _torchrun(flags, tmp_path / "job.log", tmp_path, rendezvous, max_restarts=1)
    _wait_until(lambda: (read_tracker(ckpt) or 0) >= 5, job, 300, "first checkpoint")
    killed_after = max(_losses_by_step(metrics))
    os.kill(_worker_pids(job.pid)[victim], signal.SIGKILL)
    assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    log = (tmp_path / "job.log").read_text()
    assert killed_after < ITERS and "resumed from" in log  # killed mid-run, restarted once, resumed
    losses = _losses_by_step(metrics)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert [losses[step] for step in range(1, ITERS + 1)] == uninterrupted  # bit-identical
    assert read_tracker(ckpt) == ITERS


def test_stuck_worker_ends_the_job_after_the_collective_timeout(data_prefix, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    flags = _flags(data_prefix, ["--metrics-file", str(metrics), "--distributed-timeout-minutes", "0.2"])
    flags[flags.index("--train-iters") + 1] = "100000"
    job = _torchrun(flags, tmp_path / "job.log", tmp_path)
    _wait_until(lambda: metrics.is_file() and len(_losses_by_step(metrics)) >= 3, job, 300, "training")
    workers = _worker_pids(job.pid)
    os.kill(workers[1], signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    stopped_at = time.monotonic()
    _wait_until(lambda: not os.path.exists(f"/proc/{workers[0]}") or
                open(f"/proc/{workers[0]}/stat").read().split()[2] == "Z", job, 120, "end of the waiting rank")
    waited = time.monotonic() - stopped_at
    os.kill(workers[1], signal.SIGCONT)  # let the launcher's SIGTERM reach it
    assert job.wait(timeout=120) != 0
    errors = [line for line in (tmp_path / "job.log").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 0: a collective waited longer than --distributed-timeout-minutes 0.2" \
        in errors[0], errors
    assert waited < 60  # 12 s of timeout, plus start-up of the error path on a loaded machine


def test_one_rank_failing_mid_run_is_the_jobs_only_line(tmp_path):
    # A token outside the vocabulary in one document: whichever rank reads it reports it; the
    # other rank, waiting in the gradient all-reduce, stops without a word.
    documents = random_documents(7, 40, 60)
    documents[17] = np.full(30, 1500, dtype=np.int64)
    prefix = write_dataset(tmp_path / "docs", documents)
    flags = _flags(prefix, ["--metrics-file", str(tmp_path / "metrics.jsonl")])
    job = _torchrun(flags, tmp_path / "job.log", tmp_path)
    assert job.wait(timeout=300) != 0
    log = (tmp_path / "job.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    assert f"{prefix}: token id 1500" in errors[0] and "outside the model's vocabulary of 1000" in errors[0]
    assert "[rank" not in log and "Connection closed" not in log and "gloo" not in log.lower()


def test_a_wrong_data_path_stops_every_rank_before_anything_is_built(tmp_path):
    job = _torchrun(_flags(str(tmp_path / "missing")), tmp_path / "job.log", tmp_path)
    assert job.wait(timeout=300) != 0
    log = (tmp_path / "job.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == [f"error: dataset not found: {tmp_path / 'missing'} (--data-path); pass prefixes without "
                      f".bin/.idx, as written by tools/preprocess_data.py"]
    assert "AdamW backend" not in log and "activation recompute" not in log  # no model, no optimizer
