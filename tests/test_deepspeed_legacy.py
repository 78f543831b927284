"""DeepSpeed-format checkpoints of megagrow's earlier DeepSpeed backend (real ones, tests/data): converted safely,
never handed to DeepSpeed's engine."""

import shutil
from pathlib import Path

import pytest
import torch

from distributed_harness import run_distributed
from fixtures_text import load_tool
from trainer_runs import trainer_from_flags

from megagrow.checkpoint.reader import CheckpointReader
from megagrow.errors import UserError

DATA = Path(__file__).parent / "data"
convert = load_tool("convert_deepspeed_checkpoint").main


def _converted(tmp_path, stage, ckpt_format="torch"):
    source = tmp_path / f"zero{stage}"
    shutil.copytree(DATA / f"megagrow_v1_deepspeed_zero{stage}", source)
    convert(["--load", str(source), "--save", str(tmp_path / f"converted{stage}"), "--ckpt-format", ckpt_format])
    return CheckpointReader(tmp_path / f"converted{stage}")


def test_zero1_and_zero3_checkpoints_convert_to_the_same_model(tmp_path):
    # Both runs trained the same model on the same data: ZeRO-1 keeps whole weights in its model states,
    # ZeRO-3 only fp32 partitions over the two ranks; decoding either gives the same weights.
    zero1, zero3 = _converted(tmp_path, 1), _converted(tmp_path, 3, "torch_dist")
    assert (zero1.iteration, zero1.config) == (2, zero3.config) and zero3.format == "torch_dist"
    first, third = zero1.state_dict(), zero3.state_dict()
    assert first.keys() == third.keys()
    for name in first:
        torch.testing.assert_close(third[name], first[name], atol=1e-5, rtol=0)  # the runs differ by rounding only


def _one_more_iteration(flags):
    with trainer_from_flags(flags, 1) as trainer:
        trainer.run()
        return trainer.progress.iteration, trainer.losses


def test_a_converted_checkpoint_trains_and_the_original_is_refused_by_training(tmp_path):
    from data_factory import patterned_documents, write_dataset

    reader = _converted(tmp_path, 1)
    data = write_dataset(tmp_path / "docs", patterned_documents(5, 200, 60, vocab_size=128))
    flags = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--vocab-size", "128", "--make-vocab-size-divisible-by", "8",
             "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "1", "--lr", "3e-3", "--eval-interval", "0",
             "--metrics-file", str(tmp_path / "m.jsonl")]
    iteration, losses = run_distributed(_one_more_iteration, 1, [*flags, "--load", str(reader.root)])[0]
    assert iteration == 1 and torch.isfinite(torch.tensor(losses[0][1]))  # a new run from the converted weights
    with pytest.raises(UserError, match="in DeepSpeed's own checkpoint format.*convert_deepspeed_checkpoint.py"):
        run_distributed(_one_more_iteration, 1, [*flags, "--load", str(tmp_path / "zero1")])
