"""The training loop under (tp, pp, dp) layouts reproduces the single-process losses."""

import pytest

from data_factory import patterned_documents, write_dataset
from distributed_harness import run_distributed
from trainer_runs import train_losses

STEPS = 5


def _flags(tp, pp, data_prefix, extra=()):
    return ["--model-preset", "tiny", "--num-layers", "4", "--seq-length", "32", "--vocab-size", "1000",
            "--data-path", data_prefix, "--split", "1,0,0",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--clip-grad", "1.0", "--log-interval", "100", "--eval-interval", "0",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]


def _train(tp, pp, world, extra, data_prefix, metrics_dir):
    return train_losses(_flags(tp, pp, data_prefix, extra) + ["--metrics-file", f"{metrics_dir}/metrics.jsonl"], world)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pattern", patterned_documents(1, 200, 80))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_prefix):
    return run_distributed(_train, 1, 1, 1, 1, (), data_prefix, str(tmp_path_factory.mktemp("ref")))[0]


@pytest.mark.parametrize(
    "tp, pp, dp, extra",
    [
        (2, 1, 1, ()),
        (1, 2, 1, ()),
        (1, 1, 2, ()),
        (2, 1, 1, ("--sequence-parallel",)),
        (1, 1, 2, ("--use-distributed-optimizer",)),
        (2, 2, 2, ()),
    ],
    ids=["tp2", "pp2", "dp2", "tp2-sp", "dp2-distopt", "tp2-pp2-dp2"],
)
def test_first_losses_match_single_process(reference, data_prefix, tmp_path, tp, pp, dp, extra):
    world = tp * pp * dp
    results = run_distributed(_train, world, tp, pp, world, extra, data_prefix, str(tmp_path), timeout_s=300)
    assert reference[-1] < reference[0]  # it trains
    for losses in results:  # every rank knows the loss
        assert losses == pytest.approx(reference, rel=1e-4)
