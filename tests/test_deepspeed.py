"""DeepSpeed ZeRO backend: the first losses match the native path, layouts it refuses, resume."""

import json
import os

import pytest

pytest.importorskip("deepspeed")

from data_factory import patterned_documents, write_dataset  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from megagrow.errors import UserError  # noqa: E402
from trainer_runs import train_losses, trainer_from_flags  # noqa: E402

STEPS = 5


def _flags(data_prefix, tp=1, pp=1, extra=()):
    return ["--model-preset", "tiny", "--num-layers", "4", "--seq-length", "32", "--vocab-size", "1000",
            "--data-path", data_prefix, "--split", "1,0,0", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(STEPS), "--lr", "3e-3", "--lr-warmup-iters", "2", "--clip-grad", "1.0",
            "--log-interval", "1", "--eval-interval", "0", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), *extra]


def _train(flags, world, metrics_dir):
    return train_losses(flags + ["--metrics-file", f"{metrics_dir}/metrics.jsonl"], world)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pattern", patterned_documents(1, 200, 80))


@pytest.fixture(scope="module")
def native(tmp_path_factory, data_prefix):
    metrics_dir = tmp_path_factory.mktemp("native")
    losses = run_distributed(_train, 1, _flags(data_prefix), 1, str(metrics_dir))[0]
    return Losses(losses, _grad_norms(metrics_dir))


class Losses(list):
    """The native run's per-iteration losses, with its gradient norms beside them."""

    def __init__(self, losses, grad_norms):
        super().__init__(losses)
        self.grad_norms = grad_norms


def _grad_norms(metrics_dir):
    from megagrow.training.metrics import read_metrics

    return [record["grad_norm"] for record in read_metrics(f"{metrics_dir}/metrics.jsonl", "train")]


@pytest.mark.parametrize(
    "stage, tp, pp",
    [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1), (1, 2, 1), (2, 2, 1), (0, 1, 2), (1, 1, 2)],
    ids=["zero0-dp2", "zero1-dp2", "zero2-dp2", "zero3-dp2", "zero1-tp2-dp2", "zero2-tp2-dp2", "zero0-pp2-dp2",
         "zero1-pp2-dp2"],
)
def test_zero_matches_native_losses(native, data_prefix, tmp_path, stage, tp, pp):
    world = tp * pp * 2
    flags = _flags(data_prefix, tp, pp, ["--deepspeed", "--zero-stage", str(stage)])
    results = run_distributed(_train, world, flags, world, str(tmp_path), timeout_s=300)
    assert native[-1] < native[0]
    for losses in results:
        assert losses == pytest.approx(native, rel=1e-4)
    # the norm before clipping, as Megatron logs it: ZeRO-0's engine keeps none, megagrow measures it
    assert _grad_norms(tmp_path) == pytest.approx(native.grad_norms, rel=1e-4)


# ZeRO-0 is the slow case here (bf16 gradients in .grad); ZeRO-2 keeps bf16 with ZeRO in the default run.
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_bf16_under_zero_tracks_native_bf16(data_prefix, tmp_path, stage):
    native_bf16 = run_distributed(_train, 1, _flags(data_prefix, extra=["--bf16"]), 1, str(tmp_path / "n"))[0]
    flags = _flags(data_prefix, extra=["--bf16", "--deepspeed", "--zero-stage", str(stage)])
    zero = run_distributed(_train, 2, flags, 2, str(tmp_path / "z"))[0]
    # Both keep fp32 masters; ZeRO-2 accumulates gradients in fp32 like megagrow, ZeRO-0 in the
    # bf16 .grad (DeepSpeed's choice at stage 0). bf16 rounding and the reduction order differ,
    # hence a looser tolerance than the fp32 comparisons.
    assert zero == pytest.approx(native_bf16, rel=2e-3)
    assert zero[-1] < zero[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], "use --zero-stage 1 with pipeline"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "3"], "--sequence-parallel"),
    ],
)
def test_refused_combinations(data_prefix, monkeypatch, extra, message):
    # Refused while the engine's config is built, before any process group is needed.
    from megagrow.arguments import parse_args
    from megagrow.training.deepspeed_backend import build_deepspeed_config
    from megagrow.training.trainer import micro_batches_per_step

    monkeypatch.setenv("WORLD_SIZE", "4")
    config = parse_args(_flags(data_prefix, extra=["--deepspeed", *extra]))
    with pytest.raises(UserError, match=message):
        build_deepspeed_config(config.train, config.parallel, micro_batches_per_step(config.train, config.parallel.dp))


def test_json_and_flags_must_agree(data_prefix, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 4 but --micro-batch-size gives 2"):
        run_distributed(_train, 1, _flags(data_prefix, extra=["--deepspeed", "--deepspeed_config", str(config)]), 1,
                        str(tmp_path))


def _resume_flags(data_prefix, iters, stage, extra=()):
    flags = _flags(data_prefix, extra=["--deepspeed", "--zero-stage", str(stage), *extra])
    flags[flags.index("--train-iters") + 1] = str(iters)
    return flags + ["--lr-decay-iters", "8"]


# ZeRO-3 (partitioned weights) stays in the default run; ZeRO-1 resume also runs in
# test_checkpoint_safety.py's single-process case.
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_resume_through_deepspeed_is_bit_identical(data_prefix, tmp_path, stage):
    straight = run_distributed(_train, 2, _resume_flags(data_prefix, 8, stage), 2, str(tmp_path / "a"))[0]
    ckpt = str(tmp_path / "ckpt")
    common = ["--save", ckpt, "--load", ckpt, "--save-interval", "4"]
    first = run_distributed(_train, 2, _resume_flags(data_prefix, 4, stage, common), 2, str(tmp_path / "b"))[0]
    second = run_distributed(_train, 2, _resume_flags(data_prefix, 8, stage, common), 2, str(tmp_path / "c"))[0]
    assert first + second == straight


def _train_and_evaluate(flags, world, metrics_dir):
    with trainer_from_flags(flags + ["--metrics-file", f"{metrics_dir}/metrics.jsonl"], world) as trainer:
        trainer.run()
        return trainer.evaluate()["loss"]


@pytest.mark.parametrize("stage, tp, pp", [(3, 2, 1), (1, 1, 2)], ids=["zero3-tp2", "zero1-pp2"])
def test_deepspeed_checkpoint_loads_in_megagrows_optimizer(tmp_path, stage, tp, pp):
    # A DeepSpeed run saves megagrow's checkpoints (torch_dist here for ZeRO-3): megagrow's own optimizer resumes
    # them in another layout with the Adam state, and evaluates as the DeepSpeed run did.
    prefix = write_dataset(tmp_path / "pattern", patterned_documents(2, 200, 80))
    common = ["--eval-iters", "1"]
    ckpt_format = "torch_dist" if stage == 3 else "torch"
    ds_flags = _flags(prefix, tp, pp, ["--deepspeed", "--zero-stage", str(stage), "--save", str(tmp_path / "ds"),
                                       "--ckpt-format", ckpt_format, *common])
    ds_flags[ds_flags.index("--train-iters") + 1] = "3"
    ds_flags[ds_flags.index("--split") + 1] = "80,20,0"
    ds_flags[ds_flags.index("--eval-interval") + 1] = "1000"
    world = tp * pp * 2
    ds_loss = run_distributed(_train_and_evaluate, world, ds_flags, world, str(tmp_path))[0]

    native_flags = _flags(prefix, 2, 1, ["--load", str(tmp_path / "ds")])
    native_flags[native_flags.index("--train-iters") + 1] = "3"  # already reached: evaluate only
    native_flags[native_flags.index("--split") + 1] = "80,20,0"
    native_flags[native_flags.index("--eval-interval") + 1] = "1000"
    native_flags += common
    native_loss = run_distributed(_train_and_evaluate, 2, native_flags, 2, str(tmp_path))[0]
    assert native_loss == pytest.approx(ds_loss, rel=1e-5)


def test_zero_offload_through_the_json(native, data_prefix, tmp_path):
    config = tmp_path / "offload.json"
    config.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    flags = _flags(data_prefix, extra=["--deepspeed", "--deepspeed_config", str(config)])
    losses = run_distributed(_train, 2, flags, 2, str(tmp_path), timeout_s=600)[0]
    assert losses == pytest.approx(native, rel=1e-4)


def test_zero3_partitions_unflatten_to_the_full_tensors():
    import torch

    from megagrow.checkpoint.deepspeed_reader import unflatten_zero3_partitions

    full = {"a": torch.arange(10.0).view(2, 5), "b": torch.arange(3.0) + 100}
    dp = 4
    shapes = [{name: t.shape for name, t in full.items()}]
    partitions = [[] for _ in range(dp)]
    for rank in range(dp):  # rank r holds piece r of every parameter (ceil(numel / dp) elements, padded)
        pieces = []
        for t in full.values():
            piece = -(-t.numel() // dp)
            padded = torch.cat([t.flatten(), torch.zeros(piece * dp - t.numel())])
            pieces.append(padded[rank * piece : (rank + 1) * piece])
        partitions[rank].append(torch.cat(pieces))
    rebuilt = unflatten_zero3_partitions(partitions, shapes)
    assert all(torch.equal(rebuilt[name], full[name]) for name in full)
