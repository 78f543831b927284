"""Upgrading a checkpoint of megagrow's format 1 (its own weight names; written by that version of the code):
the run resumes from the upgraded checkpoint with the losses the old code computed."""

import json
import shutil
from pathlib import Path

import pytest

from data_factory import patterned_documents, write_dataset
from distributed_harness import run_distributed
from fixtures_text import load_tool
from trainer_runs import train_losses

from megagrow.checkpoint.reader import MEGAGROW, MEGAGROW_V1, CheckpointReader
from megagrow.errors import UserError

FIXTURE = Path(__file__).parent / "data" / "megagrow_v1_tp2"
convert = load_tool("convert_checkpoint").main


def _flags(data, load, extra=()):
    # The flags of the run that wrote the fixture (its README), resumed to iteration 4.
    return ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "128", "--make-vocab-size-divisible-by", "8",
            "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--eval-interval", "0", "--log-interval", "1", "--tensor-model-parallel-size", "2", "--load", str(load),
            *extra]


def test_upgraded_checkpoint_resumes_with_the_old_codes_losses(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    data = write_dataset(tmp_path / "docs", patterned_documents(5, 200, 60, vocab_size=128))
    metrics = ["--metrics-file", str(tmp_path / "metrics.jsonl")]
    assert CheckpointReader(old).origin == MEGAGROW_V1
    with pytest.raises(UserError, match="convert it once with python tools/convert_checkpoint.py upgrade"):
        run_distributed(train_losses, 2, _flags(data, old, metrics), 2)

    convert(["upgrade", "--load", str(old), "--save", str(tmp_path / "new")])
    upgraded = CheckpointReader(tmp_path / "new")
    assert (upgraded.origin, upgraded.iteration, upgraded.tp) == (MEGAGROW, 2, 2)
    assert upgraded.common["args"].consumed_train_samples == 8 and upgraded.common["iteration"] == 2
    old_weights = CheckpointReader(old).state_dict()
    assert all((upgraded.state_dict()[name] == tensor).all() for name, tensor in old_weights.items())

    losses = run_distributed(train_losses, 2, _flags(data, tmp_path / "new", metrics), 2)[0]
    expected = json.loads((FIXTURE / "old_run_losses.json").read_text())["losses"]
    assert losses == pytest.approx([expected["3"], expected["4"]], abs=1e-5)
