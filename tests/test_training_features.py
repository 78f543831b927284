"""Training-loop features: skipped steps, metrics file, precisions, uneven pipeline split, YAML config."""

import math

import pytest
import torch

from data_factory import patterned_documents, write_dataset
from distributed_harness import run_distributed
from megagrow.arguments import parse_args
from megagrow.errors import UserError
from megagrow.training.metrics import read_metrics
from trainer_runs import trainer_from_flags


def _flags(iters, extra=(), data=("--mock-data",)):
    return ["--model-preset", "tiny", "--seq-length", "16", *data, "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "3e-3", "--log-interval", "1",
            "--eval-interval", "2", "--eval-iters", "1", *extra]


def _train(flags, world=1, poison_iterations=()):
    with trainer_from_flags(flags, world) as trainer:
        if poison_iterations:
            def poison(_module, _inputs, output):
                # The iteration being computed is progress.iteration + 1.
                return output * float("nan") if trainer.progress.iteration + 1 in poison_iterations else output
            trainer.model.decoder.layers[0].register_forward_hook(poison)
        trainer.run()
        masters = [f.master.dtype for f in trainer.optimization.optimizer.fragments]
        return trainer.losses, trainer.progress, masters, [p.dtype for p in trainer.model.parameters()]


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path):
    metrics = tmp_path / "m.jsonl"
    losses, progress, _, _ = run_distributed(_train, 1, _flags(5, ["--metrics-file", str(metrics)]), 1, (2, 3))[0]
    assert progress.skipped_steps == 2 and progress.iteration == 5
    assert math.isnan(losses[1][1]) and math.isfinite(losses[4][1])
    train_records = read_metrics(metrics, "train")
    assert [r["skipped_steps"] for r in train_records] == [0, 1, 2, 2, 2]
    assert not math.isfinite(train_records[1]["grad_norm"])


def test_too_many_consecutive_skips_stop_with_a_clear_message(tmp_path):
    flags = _flags(10, ["--max-consecutive-skipped-steps", "3", "--metrics-file", str(tmp_path / "m.jsonl")])
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite loss"):
        run_distributed(_train, 1, flags, 1, (2, 3, 4, 5))


def test_metrics_file_has_the_logged_fields(tmp_path):
    metrics = tmp_path / "m.jsonl"
    run_distributed(_train, 1, _flags(4, ["--metrics-file", str(metrics)]))
    train = read_metrics(metrics, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_second", "tflops_per_device", "memory_gb"):
        assert key in train[0]
    assert train[-1]["consumed_tokens"] == 4 * 4 * 16
    valid = read_metrics(metrics, "valid")
    assert [r["step"] for r in valid] == [2, 4] and valid[0]["perplexity"] == pytest.approx(math.exp(valid[0]["loss"]))
    assert [r["consumed_tokens"] for r in valid] == [2 * 4 * 16, 4 * 4 * 16]


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_low_precision_trains_with_fp32_masters(tmp_path, precision):
    prefix = write_dataset(tmp_path / "pattern", patterned_documents(0, 300, 40))
    flags = _flags(8, [precision, "--vocab-size", "1000", "--lr", "1e-2", "--initial-loss-scale", "1024",
                       "--metrics-file", str(tmp_path / "m.jsonl")],
                   data=("--data-path", prefix, "--split", "95,5,0"))
    losses, progress, masters, params = run_distributed(_train, 1, flags)[0]
    expected = torch.bfloat16 if precision == "--bf16" else torch.float16
    assert set(params) == {expected} and set(masters) == {torch.float32}
    finite = [loss for _, loss in losses if math.isfinite(loss)]
    assert len(finite) >= 6 and finite[-1] < finite[0]


def test_uneven_pipeline_split_matches_single_process(tmp_path):
    flags = _flags(3, ["--num-layers", "3", "--eval-interval", "0", "--metrics-file", str(tmp_path / "m.jsonl")])
    reference = run_distributed(_train, 1, flags)[0][0]
    split = flags + ["--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "2", "1"]
    results = run_distributed(_train, 2, split, 2)
    for losses, *_ in results:
        assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference], rel=1e-5)


def test_yaml_config_with_flags_taking_precedence(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model_preset: tiny\nnum_layers: 6\nlr: 0.01\nmock_data: true\ntrain_iters: 7\n"
                           "micro_batch_size: 2\nglobal_batch_size: 4\n")
    config = parse_args(["--config", str(config_file), "--lr", "0.02"])
    assert config.model.num_layers == 6 and config.train.lr == 0.02 and config.train.train_iters == 7
    config_file.write_text("num_layerz: 6\n")
    with pytest.raises(UserError, match="unknown settings num_layerz"):
        parse_args(["--config", str(config_file)])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tensor-model-parallel-size", "3"], "world size 1 is not divisible"),
        (["--bf16", "--fp16"], "choose one precision"),
        (["--normalization", "LayerNorm"], "RMSNorm"),
        (["--hidden-dropout", "0.1"], "dropout is not supported"),
        (["--num-layers", "3", "--pipeline-layer-split", "2", "2"], "adding up to --num-layers 3"),
        (["--train-tokens", "100"], "--train-iters and --train-tokens both given"),
    ],
)
def test_conflicting_settings_are_refused(extra, message):
    with pytest.raises(UserError, match=message):
        parse_args(_flags(5) + extra)


def test_per_domain_validation_losses_and_mixture_record(tmp_path):
    code = write_dataset(tmp_path / "code_text_document", patterned_documents(0, 120, 40))
    prose = write_dataset(tmp_path / "prose_text_document", patterned_documents(1, 120, 40, vocab_size=500))
    metrics = tmp_path / "m.jsonl"
    flags = _flags(4, ["--vocab-size", "1000", "--metrics-file", str(metrics)],
                   data=("--data-path", "0.25", code, "0.75", prose, "--split", "80,20,0"))
    run_distributed(_train, 1, flags)
    mixture = read_metrics(metrics, "mixture")
    assert mixture == [{"kind": "mixture", "step": 0, "weights": {"code": 0.25, "prose": 0.75},
                        "prefixes": {"code": code, "prose": prose}}]
    valid = read_metrics(metrics, "valid")
    assert [r["step"] for r in valid] == [2, 4]
    for record in valid:
        assert set(record["domain_losses"]) == {"code", "prose"}
        assert all(math.isfinite(v) for v in record["domain_losses"].values())
