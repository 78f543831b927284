"""Growing sharded checkpoints (tools/stack_checkpoint.py): exactly grow() on the full state dict,
across layouts; the grown checkpoint trains; broken inputs fail with one line."""


import pytest
import torch
from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed
from fixtures_text import load_tool

from megagrow.checkpoint.layout import checkpoint_layout, iteration_dir, load_shard, read_tracker
from megagrow.checkpoint.reader import CheckpointReader, group_keys, group_param_names
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded
from megagrow.checkpoint.tp_layout import full_shape
from megagrow.config import ModelConfig
from megagrow.growth import GrowthSpec, grow
from trainer_runs import trainer_from_flags

stack = load_tool("stack_checkpoint").main

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=50, seq_length=8, make_vocab_size_divisible_by=8)


def _full_state(config: ModelConfig) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(full_shape(name, config), generator=generator)
            for group in group_keys(config) for name in group_param_names(group, config)}


def _stack(load, save, factor, tp, pp, *extra):
    return stack(["--load", str(load), "--save", str(save), "--growth-factor", str(factor),
                  "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
                  "--no-progress-bar", *extra])


@pytest.mark.parametrize("source, target, operator, tied", [
    ((1, 2), (2, 4), "depth:stack", False),
    ((2, 1), (1, 2), "depth:stack", True),
    ((2, 1), (1, 2), "depth:random", False),
], ids=["tp1pp2-to-tp2pp4", "tp2pp1-to-tp1pp2-tied", "random-new-layers"])
def test_sharded_growth_equals_growing_the_full_state_dict(tmp_path, source, target, operator, tied):
    config = CONFIG.replace(tie_embeddings=tied)
    full = _full_state(config)
    save_sharded(tmp_path / "base", 7, config, reader_from_state_dict(full, config), tp=source[0], pp=source[1],
                 progress=False)
    _stack(tmp_path / "base", tmp_path / "grown", 2, *target, "--operator", operator)

    expected, grown_config = grow(full, config, GrowthSpec(operator, factor=2))
    reader = CheckpointReader(tmp_path / "grown")
    assert (reader.iteration, reader.tp, reader.pp, reader.config) == (7, *target, grown_config)
    grown = reader.state_dict()
    assert grown.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(grown[name], tensor), name
    file = load_shard(tmp_path / "grown", tp_rank=target[0] - 1, pp_rank=target[1] - 1, pp_size=target[1])
    record = file["megagrow"]
    assert record["growth"]["operator"] == operator and record["growth"]["factor"] == 2
    assert (record["growth"]["source_iteration"], record["growth"]["source_num_layers"]) == (7, 2)
    assert record["growth"]["source"] == str((tmp_path / "base").resolve())
    assert "progress" not in record  # model only: training starts a new run from it
    assert file["args"].num_layers == 4 and file["iteration"] == 7  # what Megatron-LM reads


def _flags(data_prefix, tp, pp, iters, layers, extra=()):
    return ["--model-preset", "tiny", "--num-layers", str(layers), "--vocab-size", "1000", "--seq-length", "16",
            "--data-path", data_prefix, "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "3e-3", "--log-interval", "100", "--eval-interval", "0",
            "--eval-iters", "1", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            *extra]


def _train(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        start = trainer.progress.iteration
        trainer.run()
        return start, trainer.losses


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "docs", random_documents(3, 300, 60))


def test_grown_checkpoint_trains_fresh_or_resuming(tmp_path, data_prefix):
    base = str(tmp_path / "base")
    metrics = ["--metrics-file", str(tmp_path / "metrics.jsonl")]
    run_distributed(_train, 2, _flags(data_prefix, 1, 2, 2, 2, [*metrics, "--save", base]), 2)

    # Model only, into another layout: a new run of the 4-layer model.
    _stack(base, tmp_path / "fresh", 2, 2, 1)
    start, losses = run_distributed(_train, 2, _flags(data_prefix, 2, 1, 2, 4, [*metrics, "--load",
                                                                               str(tmp_path / "fresh")]), 2)[0]
    assert start == 0 and len(losses) == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in losses)

    # With the run state and stacked Adam moments: resumes at the base's iteration.
    _stack(base, tmp_path / "resumed", 2, 1, 1, "--stack-optimizer-state")
    resumed = CheckpointReader(tmp_path / "resumed")
    adam = resumed.shard_file(0, 0)["megagrow"]["optimizer"]["params"]
    # Global layer 1 lives on the second base stage, where it is that stage's layer 0.
    base_adam = CheckpointReader(base).shard_file(0, 1)["megagrow"]["optimizer"]["params"][
        "decoder.layers.0.mlp.linear_fc2.weight"]
    for copy in ("decoder.layers.1.mlp.linear_fc2.weight", "decoder.layers.3.mlp.linear_fc2.weight"):
        assert torch.equal(adam[copy]["exp_avg_sq"], base_adam["exp_avg_sq"])
        assert adam[copy]["step"] == base_adam["step"] == 2
    assert resumed.run_position().progress["iteration"] == 2 and resumed.common["iteration"] == 2
    start, losses = run_distributed(_train, 1, _flags(data_prefix, 1, 1, 4, 4, [*metrics, "--load",
                                                                               str(tmp_path / "resumed")]), 1)[0]
    assert start == 2 and [i for i, _ in losses] == [3, 4]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses)


def test_refusals_are_one_line(tmp_path, capsys):
    full = _full_state(CONFIG)
    save_sharded(tmp_path / "base", 1, CONFIG, reader_from_state_dict(full, CONFIG), tp=2, pp=1, progress=False)
    other = CONFIG.replace(ffn_hidden_size=64)
    save_sharded(tmp_path / "other", 1, other, reader_from_state_dict(_full_state(other), other), tp=2, pp=1,
                 progress=False)
    mixed = tmp_path / "mixed"
    save_sharded(mixed, 1, CONFIG, reader_from_state_dict(full, CONFIG), tp=2, pp=1, progress=False)
    shard = iteration_dir(mixed, 1) / "mp_rank_01" / "model_optim_rng.pt"
    shard.write_bytes((iteration_dir(tmp_path / "other", 1) / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    cases = [
        ((tmp_path / "missing", tmp_path / "a", 2, 1, 1), "not found"),
        ((mixed, tmp_path / "b", 2, 1, 1), "model config differs"),
        ((tmp_path / "base", tmp_path / "c", 2, 4, 1), "num_query_groups 2 is not divisible by tensor-parallel size 4"),
        ((tmp_path / "base", tmp_path / "d", 2, 1, 3), "not divisible by --target-pipeline-parallel-size 3"),
        ((tmp_path / "base", tmp_path / "other", 2, 1, 1), "already holds a checkpoint"),
        ((tmp_path / "base", tmp_path / "e", 2, 1, 1, "--stack-optimizer-state"), "holds a model only"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit):
            _stack(*args)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (message, lines)
    assert read_tracker(tmp_path / "d") is None and checkpoint_layout(tmp_path / "other", 1) == (2, 1)
