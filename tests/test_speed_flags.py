"""--recompute-granularity, --cross-entropy-chunk-size and --compile-mlp reach the model and leave training unchanged."""

import pytest

from distributed_harness import run_distributed
from megagrow.arguments import parse_args
from megagrow.errors import UserError
from trainer_runs import train_losses

FLAGS = ["--model-preset", "tiny", "--seq-length", "16", "--mock-data", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--log-interval", "1",
         "--eval-interval", "0"]
SPEED_FLAGS = ["--recompute-granularity", "full", "--cross-entropy-chunk-size", "7"]


def test_flags_land_in_the_train_config():
    train = parse_args(FLAGS + SPEED_FLAGS + ["--compile-mlp"]).train
    assert (train.recompute_granularity, train.cross_entropy_chunk_size, train.compile_mlp) == ("full", 7, True)
    train = parse_args(FLAGS).train
    assert (train.recompute_granularity, train.cross_entropy_chunk_size, train.compile_mlp) == (None, None, False)


def test_unknown_granularity_is_refused_by_the_parser():
    with pytest.raises(UserError, match="--recompute-granularity: invalid choice: 'block'"):
        parse_args(FLAGS + ["--recompute-granularity", "block"])


def _both_runs(tmp_dir):
    plain = train_losses(FLAGS + ["--metrics-file", f"{tmp_dir}/plain.jsonl"])
    fast = train_losses(FLAGS + SPEED_FLAGS + ["--metrics-file", f"{tmp_dir}/fast.jsonl"])
    return plain, fast


def test_training_with_recompute_and_chunked_loss_matches(tmp_path):
    plain, fast = run_distributed(_both_runs, 1, str(tmp_path))[0]
    assert len(plain) == 3
    # Only the head's weight grad is summed in another order: equal to float32 rounding.
    assert fast == pytest.approx(plain, rel=1e-5)
