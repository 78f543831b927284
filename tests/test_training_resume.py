"""Checkpoint/resume of the training loop: bit-identical continuation, signals, refusals."""

import os
import signal
import subprocess
import sys
import time

import pytest

from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed
from megagrow.errors import UserError
from megagrow.checkpoint.layout import read_tracker
from megagrow.training.metrics import read_metrics
from trainer_runs import trainer_from_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(data_prefix, iters, extra=()):
    return ["--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data_prefix,
            "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-iters", "10", "--log-interval", "5",
            "--eval-interval", "5",
            "--eval-iters", "1", *extra]


def _run(flags):
    with trainer_from_flags(flags) as trainer:
        trainer.run()
        return trainer.losses


@pytest.fixture
def data_prefix(tmp_path):
    return write_dataset(tmp_path / "docs", random_documents(3, 400, 60))


def test_resume_continues_bit_identically(tmp_path, data_prefix):
    straight = run_distributed(_run, 1, _flags(data_prefix, 10, ["--metrics-file", str(tmp_path / "a.jsonl")]))[0]
    ckpt = str(tmp_path / "ckpt")
    common = ["--save", ckpt, "--load", ckpt, "--save-interval", "5"]
    first = run_distributed(_run, 1, _flags(data_prefix, 5, common))[0]
    assert read_tracker(ckpt) == 5
    second = run_distributed(_run, 1, _flags(data_prefix, 10, common))[0]
    assert [i for i, _ in second] == list(range(6, 11))
    assert [loss for _, loss in first + second] == [loss for _, loss in straight]  # bit-identical


def _run_on(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        trainer.run()
        return trainer.losses


def test_torch_dist_resume_with_the_distributed_optimizer_continues_bit_identically(tmp_path, data_prefix):
    # Two data-parallel ranks, each with its slice of the optimizer, saving Megatron-LM's torch_dist format.
    flags = ["--use-distributed-optimizer", "--ckpt-format", "torch_dist", "--metrics-file", str(tmp_path / "m.jsonl")]
    straight = run_distributed(_run_on, 2, _flags(data_prefix, 6, flags), 2)[0]
    ckpt = str(tmp_path / "ckpt")
    common = [*flags, "--save", ckpt, "--load", ckpt, "--save-interval", "3"]
    first = run_distributed(_run_on, 2, _flags(data_prefix, 3, common), 2)[0]
    assert read_tracker(ckpt) == 3 and (tmp_path / "ckpt" / "iter_0000003" / ".metadata").is_file()
    second = run_distributed(_run_on, 2, _flags(data_prefix, 6, common), 2)[0]
    assert [loss for _, loss in first + second] == [loss for _, loss in straight]


def test_optimizer_state_resumes_in_another_layout(tmp_path, data_prefix):
    # Saved by two data-parallel ranks with the distributed optimizer, resumed by one run of tp=2 with the plain
    # optimizer: the Adam state is kept per parameter, so it regroups like the weights.
    metrics = ["--metrics-file", str(tmp_path / "m.jsonl")]
    straight = run_distributed(_run_on, 2, _flags(data_prefix, 6, ["--use-distributed-optimizer", *metrics]), 2)[0]
    ckpt = str(tmp_path / "ckpt")
    first = run_distributed(_run_on, 2, _flags(data_prefix, 3, ["--use-distributed-optimizer", "--save", ckpt,
                                                                *metrics]), 2)[0]
    second = run_distributed(_run_on, 2, _flags(data_prefix, 6, ["--tensor-model-parallel-size", "2", "--load", ckpt,
                                                                 *metrics]), 2)[0]
    assert [i for i, _ in second] == [4, 5, 6]
    assert [loss for _, loss in first + second] == pytest.approx([loss for _, loss in straight], rel=1e-5)
    # A fresh optimizer instead would not follow the run: the carried moments matter.
    fresh = run_distributed(_run_on, 2, _flags(data_prefix, 6, ["--tensor-model-parallel-size", "2", "--load", ckpt,
                                                                "--no-load-optim", *metrics]), 2)[0]
    assert [loss for _, loss in fresh] != pytest.approx([loss for _, loss in second], rel=1e-5)


def test_exit_interval_cuts_a_run_into_legs_that_continue_bit_identically(tmp_path, data_prefix):
    straight = run_distributed(_run, 1, _flags(data_prefix, 10, ["--lr-decay-iters", "10"]))[0]
    ckpt = str(tmp_path / "ckpt")
    metrics = tmp_path / "legs.jsonl"
    legs = ["--save", ckpt, "--load", ckpt, "--exit-interval", "4", "--metrics-file", str(metrics)]
    first = run_distributed(_run, 1, _flags(data_prefix, 10, legs))[0]
    assert [i for i, _ in first] == [1, 2, 3, 4] and read_tracker(ckpt) == 4  # saved without --save-interval
    second = run_distributed(_run, 1, _flags(data_prefix, 10, legs))[0]
    assert [i for i, _ in second] == [5, 6, 7, 8] and read_tracker(ckpt) == 8
    third = run_distributed(_run, 1, _flags(data_prefix, 10, legs))[0]
    assert [i for i, _ in third] == [9, 10] and read_tracker(ckpt) == 10
    assert [loss for _, loss in first + second + third] == [loss for _, loss in straight]
    assert [r["step"] for r in read_metrics(metrics, "train")] == [4, 5, 8, 10]  # every leg logs its last iteration


def test_load_with_another_model_fails_with_one_line(tmp_path, data_prefix):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_run, 1, _flags(data_prefix, 2, ["--save", ckpt]))
    with pytest.raises(UserError, match=r"hidden_size 64 \(checkpoint\) vs 128 \(this run\)"):
        run_distributed(_run, 1, _flags(data_prefix, 4, ["--load", ckpt, "--hidden-size", "128"]))


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_exits(tmp_path, data_prefix, stop_signal):
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *_flags(data_prefix, 100000),
               "--save", str(ckpt), "--log-interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in process.stdout:  # wait until training is under way
        if "iteration 2/" in line:
            break
    time.sleep(0.5)
    process.send_signal(stop_signal)  # SIGINT: Ctrl-C
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    saved = read_tracker(ckpt)
    assert saved is not None and 2 <= saved < 100000
    assert f"received {stop_signal.name}" in output and "stopped by signal" in output


def test_bad_flags_fail_at_start_up_with_one_line(data_prefix):
    command = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *_flags(data_prefix, 5),
               "--global-batch-size", "5"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --global-batch-size 5 is not divisible by --micro-batch-size 2 x data-parallel size 1; "
        "make it a multiple of 2"]
