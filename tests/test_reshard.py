"""Resharding megagrow checkpoints: exact round trips between layouts, same loss when training loads them."""


import pytest
import torch

from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed
from fixtures_text import load_tool, run_tool
from megagrow.checkpoint.reader import CheckpointReader, group_keys, group_param_names
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded
from megagrow.checkpoint.tp_layout import full_shape
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.checkpoint.layout import checkpoint_layout, iteration_dir, load_shard, read_tracker
from trainer_runs import trainer_from_flags

convert = load_tool("convert_checkpoint").main
TRAIN_ITERS = 2


def _flags(data_prefix, tp, pp, extra=()):
    return ["--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data_prefix,
            "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3", "--log-interval", "100", "--eval-interval", "0",
            "--eval-iters", "1", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            *extra]


def _train_then_evaluate(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        trainer.run()
        return trainer.evaluate()


def _load_then_evaluate(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        assert trainer.progress.iteration == 0  # a converted checkpoint starts a new run
        return trainer.evaluate()


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "docs", random_documents(3, 300, 60))


def _shard_models(root) -> dict:
    tp, pp = checkpoint_layout(root, read_tracker(root))
    return {(t, p): load_shard(root, tp_rank=t, pp_rank=p, pp_size=pp)["model"] for t in range(tp) for p in range(pp)}


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            if a[key][name] is None:  # the local spec's _extra_state entries
                assert b[key][name] is None, (key, name)
            else:
                assert torch.equal(a[key][name], b[key][name]), (key, name)


def _reshard(source, target, tp, pp):
    convert(["reshard", "--load", str(source), "--save", str(target), "--target-tensor-parallel-size", str(tp),
             "--target-pipeline-parallel-size", str(pp)])
    return str(target)


@pytest.mark.parametrize("tp, pp, extra, targets", [
    (2, 1, (), [(1, 1), (1, 2)]),
    (1, 2, ("--tie-embeddings",), [(1, 1), (2, 1)]),
], ids=["from-tp2", "from-pp2-tied"])
def test_resharded_checkpoint_round_trips_and_gives_the_same_loss(tmp_path, data_prefix, tp, pp, extra, targets):
    original = str(tmp_path / "original")
    metrics = ["--metrics-file", str(tmp_path / "metrics.jsonl")]
    trained = run_distributed(_train_then_evaluate, tp * pp,
                              _flags(data_prefix, tp, pp, [*extra, *metrics, "--save", original]), tp * pp)
    reference_loss = trained[0]
    full = CheckpointReader(original).state_dict()
    for target_tp, target_pp in targets:
        resharded = _reshard(original, tmp_path / f"tp{target_tp}pp{target_pp}", target_tp, target_pp)
        assert checkpoint_layout(resharded, TRAIN_ITERS) == (target_tp, target_pp)
        reader = CheckpointReader(resharded)
        assert reader.state_dict().keys() == full.keys()
        assert all(torch.equal(tensor, full[name]) for name, tensor in reader.state_dict().items())
        back = _reshard(resharded, tmp_path / f"back_from_tp{target_tp}pp{target_pp}", tp, pp)
        _assert_same_tensors(_shard_models(back), _shard_models(original))
    # Training loads the last target (a layout of the other kind) and sees the same loss.
    world = target_tp * target_pp
    losses = run_distributed(_load_then_evaluate, world,
                             _flags(data_prefix, target_tp, target_pp, [*extra, *metrics, "--load", resharded]), world)
    assert losses[0] == pytest.approx(reference_loss, abs=1e-5)


def _tiny_full_state(config: ModelConfig) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(full_shape(name, config), generator=generator)
            for group in group_keys(config) for name in group_param_names(group, config)}


CONFIG = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=50, seq_length=8, make_vocab_size_divisible_by=8)


def test_uneven_pipeline_split_round_trips(tmp_path):
    full = _tiny_full_state(CONFIG)
    save_sharded(tmp_path / "ckpt", 5, CONFIG, reader_from_state_dict(full, CONFIG), tp=2, pp=2,
                 layers_per_stage=[1, 2], progress=False)
    reader = CheckpointReader(tmp_path / "ckpt")
    assert (reader.iteration, reader.tp, reader.pp, reader.layers_per_stage) == (5, 2, 2, [1, 2])
    # megatron-core's names, layers numbered from each stage's first, with the local spec's _extra_state.
    modules = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    assert sorted(load_shard(tmp_path / "ckpt", tp_rank=1, pp_rank=1, pp_size=2)["model"]) == sorted(
        [f"decoder.layers.{n}.{s}" for n in (0, 1) for s in ("input_layernorm.weight", "pre_mlp_layernorm.weight",
                                                              *(f"{m}.weight" for m in modules),
                                                              *(f"{m}._extra_state" for m in modules))]
        + ["decoder.final_layernorm.weight", "output_layer.weight", "output_layer._extra_state"])
    assert all(torch.equal(tensor, full[name]) for name, tensor in reader.state_dict().items())
    assert not list(tmp_path.glob("ckpt/*.tmp"))


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_resharding_equals_building_each_shard_whole(tmp_path, tied):
    config = CONFIG.replace(tie_embeddings=tied)
    full = _tiny_full_state(config)
    save_sharded(tmp_path / "ckpt", 2, config, reader_from_state_dict(full, config), tp=2, pp=1, progress=False)
    reader = CheckpointReader(tmp_path / "ckpt")
    for name, describe in (("whole", None), ("streamed", reader.describe_group)):
        save_sharded(tmp_path / name, 2, config, reader.read_group, tp=1, pp=3, describe_group=describe,
                     progress=False)
    _assert_same_tensors(_shard_models(tmp_path / "streamed"), _shard_models(tmp_path / "whole"))
    assert all(torch.equal(tensor, full[name]) for name, tensor in CheckpointReader(tmp_path / "streamed").state_dict().items())
    assert not list(tmp_path.glob("streamed/*.tmp"))


def test_broken_checkpoints_and_targets_fail_with_one_line(tmp_path, capsys):
    full = _tiny_full_state(CONFIG)
    save_sharded(tmp_path / "ckpt", 1, CONFIG, reader_from_state_dict(full, CONFIG), tp=2, pp=1, progress=False)
    with pytest.raises(UserError, match="num_query_groups 2 is not divisible by tensor-parallel size 4"):
        save_sharded(tmp_path / "bad", 1, CONFIG, reader_from_state_dict(full, CONFIG), tp=4, pp=1, progress=False)
    with pytest.raises(UserError, match="not divisible by --target-pipeline-parallel-size 2"):
        save_sharded(tmp_path / "bad", 1, CONFIG, reader_from_state_dict(full, CONFIG), tp=1, pp=2, progress=False)
    # A shard from another model: its config record differs.
    other = CONFIG.replace(ffn_hidden_size=64)
    save_sharded(tmp_path / "other", 1, other, reader_from_state_dict(_tiny_full_state(other), other), tp=2, pp=1,
                 progress=False)
    shard = iteration_dir(tmp_path / "ckpt", 1) / "mp_rank_01" / "model_optim_rng.pt"
    shard.write_bytes((iteration_dir(tmp_path / "other", 1) / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    with pytest.raises(UserError, match="mp_rank_01: its model config differs"):
        CheckpointReader(tmp_path / "ckpt")
    shard.unlink()
    for argv, message in [
        (["reshard", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "new")], "shards missing"),
        (["to-hf", "--load", str(tmp_path / "none"), "--save", str(tmp_path / "hf")], "not found"),
        (["reshard", "--load", str(tmp_path / "other"), "--save", str(tmp_path / "other")], "is the --load directory"),
    ]:
        with pytest.raises(SystemExit):
            convert(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], lines


def test_the_script_reports_a_user_error_in_one_line_and_status_2(tmp_path):
    result = run_tool("convert_checkpoint", "reshard", "--load", tmp_path / "missing", "--save", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint directory not found: {tmp_path / 'missing'} (check --load)"]
