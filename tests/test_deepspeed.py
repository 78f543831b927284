"""DeepSpeed ZeRO backend: the first losses match the native path, layouts it refuses, resume."""

import json
import os

import pytest

pytest.importorskip("deepspeed")

from data_factory import patterned_documents, write_dataset  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from megagrow.arguments import parse_args  # noqa: E402
from megagrow.errors import UserError  # noqa: E402
from megagrow.parallel import state  # noqa: E402
from megagrow.training.trainer import Trainer  # noqa: E402

STEPS = 5


def _flags(data_prefix, tp=1, pp=1, extra=()):
    return ["--model-preset", "tiny", "--num-layers", "4", "--seq-length", "32", "--vocab-size", "1000",
            "--data-path", data_prefix, "--split", "1,0,0", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(STEPS), "--lr", "3e-3", "--lr-warmup-iters", "2", "--clip-grad", "1.0",
            "--log-interval", "100", "--eval-interval", "0", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), *extra]


def _train(flags, world, metrics_dir):
    os.environ.update(WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()))
    config = parse_args(flags + ["--metrics-file", f"{metrics_dir}/metrics.jsonl"])
    state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp)
    try:
        trainer = Trainer(config.model, config.parallel, config.train, config.data)
        trainer.run()
        return [loss for _, loss in trainer.losses]
    finally:
        state.destroy()


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pattern", patterned_documents(1, 200, 80))


@pytest.fixture(scope="module")
def native(tmp_path_factory, data_prefix):
    return run_distributed(_train, 1, _flags(data_prefix), 1, str(tmp_path_factory.mktemp("native")))[0]


@pytest.mark.parametrize(
    "stage, tp, pp",
    [(1, 1, 1), (2, 1, 1), (3, 1, 1), (1, 2, 1), (1, 1, 2)],
    ids=["zero1-dp2", "zero2-dp2", "zero3-dp2", "zero1-tp2-dp2", "zero1-pp2-dp2"],
)
def test_zero_matches_native_losses(native, data_prefix, tmp_path, stage, tp, pp):
    world = tp * pp * 2
    flags = _flags(data_prefix, tp, pp, ["--deepspeed", "--zero-stage", str(stage)])
    results = run_distributed(_train, world, flags, world, str(tmp_path), timeout_s=300)
    assert native[-1] < native[0]
    for losses in results:
        assert losses == pytest.approx(native, rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], "use --zero-stage 1 with pipeline"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "3"], "--sequence-parallel"),
    ],
)
def test_refused_combinations(data_prefix, tmp_path, extra, message):
    flags = _flags(data_prefix, extra=["--deepspeed", *extra])
    with pytest.raises(UserError, match=message):
        run_distributed(_train, 4, flags, 4, str(tmp_path))


def test_json_and_flags_must_agree(data_prefix, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 4 but --micro-batch-size gives 2"):
        run_distributed(_train, 1, _flags(data_prefix, extra=["--deepspeed", "--deepspeed_config", str(config)]), 1,
                        str(tmp_path))
