"""Adam state shared with megatron-core 0.16.1 itself: megagrow resumes with the moments and step megatron-core's
optimizer saved (torch and torch_dist formats), and that optimizer loads what megagrow saves in torch_dist and
keeps training."""

import os

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_core_harness as mc  # noqa: E402
from data_factory import random_documents, write_dataset  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from trainer_runs import trainer_from_flags  # noqa: E402

from megagrow.checkpoint.tp_layout import merge_from_tp  # noqa: E402
from megagrow.config import ModelConfig  # noqa: E402
from megagrow.errors import UserError  # noqa: E402

CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=250, seq_length=16, make_vocab_size_divisible_by=8)
BATCHES = [torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(i))
           for i in range(2)]
MOMENTS = ("exp_avg", "exp_avg_sq")
VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def _flags(data, tp, extra):
    return ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "250", "--make-vocab-size-divisible-by", "8",
            "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-2", "--eval-interval", "0", "--log-interval", "100",
            "--tensor-model-parallel-size", str(tp), "--ckpt-format", "torch_dist", *extra]


def _megatron_core_trains_and_saves(root, tp, ckpt_format, bf16=False):
    mc.initialize(tp, 1)
    torch.manual_seed(11)
    model = mc.stage_model(CONFIG, tp, 1, 0)
    with mc.optimizer_cuda_shims():
        ddp, optimizer = mc.megatron_optimizer(model, bf16=bf16)
        for tokens in BATCHES:
            mc.train_step(ddp, optimizer, tokens)
        args = mc.megatron_lm_args(CONFIG, tp, 1, iteration=len(BATCHES), consumed_train_samples=4 * len(BATCHES),
                                   global_batch_size=4, ckpt_format=ckpt_format)
        args.bf16, args.params_dtype = bf16, torch.bfloat16 if bf16 else torch.float32
        mc.save_like_megatron_lm(model, root, args=args, iteration=len(BATCHES), tp_rank=torch.distributed.get_rank(),
                                 pp_rank=0, pp=1, ckpt_format=ckpt_format, optimizer=optimizer)
    return mc.adam_state(model, optimizer)


def _megagrow_loads(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        return trainer.progress.iteration, trainer.optimization.optimizer_record()["params"]


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory):
    """Checkpoints of 2 megatron-core updates at tp=2 as Megatron-LM saves them, torch_dist and torch, with each
    rank's Adam state by parameter name."""
    runs = {}
    for ckpt_format in ("torch_dist", "torch"):
        root = tmp_path_factory.mktemp(f"megatron_adam_{ckpt_format}")
        runs[ckpt_format] = root, run_distributed(_megatron_core_trains_and_saves, 2, str(root), 2, ckpt_format,
                                                  daemon=False)
    return runs


@pytest.fixture
def megatron_run(megatron_runs):
    return megatron_runs["torch_dist"]


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp", [2, 1], ids=["same-layout", "tp2-into-tp1"])
def test_megagrow_resumes_with_megatron_cores_adam_state(tmp_path, megatron_runs, tp, ckpt_format):
    root, theirs = megatron_runs[ckpt_format]
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = _flags(data, tp, ["--train-iters", "10", "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl")])
    loaded = run_distributed(_megagrow_loads, tp, flags, tp)
    for iteration, params in loaded:
        assert iteration == 2
        assert set(params) == set(theirs[0]) and all(record["step"] == 2 for record in params.values())
    for name in theirs[0]:
        for kind in MOMENTS:
            if tp == 2:
                for rank in range(2):
                    real = _real_rows(name, rank, theirs[rank][name][kind].shape[0])
                    torch.testing.assert_close(loaded[rank][1][name][kind][real], theirs[rank][name][kind][real],
                                               rtol=0, atol=0)
            else:  # regrouped from megatron-core's two tp shards
                expected = merge_from_tp(name, [theirs[rank][name][kind] for rank in range(2)], CONFIG)
                real = _real_rows(name, 0, expected.shape[0])
                torch.testing.assert_close(loaded[0][1][name][kind][real], expected[real], rtol=0, atol=0)


def _real_rows(name: str, tp_rank: int, rows: int) -> slice:
    """The rows of a tp shard that are real vocabulary entries. Megatron-LM's loss includes the padding columns in
    its softmax, megagrow's does not, so the padding rows' moments (and weights) are dropped on the way in."""
    if name not in VOCAB_PARALLEL:
        return slice(None)
    return slice(0, max(0, min(rows, CONFIG.vocab_size - tp_rank * rows)))


def _megagrow_trains_and_saves(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        trainer.run()
        return trainer.optimization.optimizer_record()["params"]


def _megatron_core_loads_and_steps(directory, tp, bf16):
    from megatron.core import dist_checkpointing

    mc.initialize(tp, 1)
    torch.manual_seed(5)  # other weights than megagrow's: the load must replace them
    model = mc.stage_model(CONFIG, tp, 1, 0)
    with mc.optimizer_cuda_shims():
        ddp, optimizer = mc.megatron_optimizer(model, bf16=bf16)
        state = mc.optimizer_checkpoint_state(model, optimizer, {}, is_loading=True)
        loaded = dist_checkpointing.load(state, directory)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        after_load = mc.adam_state(model, optimizer)
        mc.train_step(ddp, optimizer, BATCHES[0])  # it keeps training from there
        steps = {float(record["step"]) for record in mc.adam_state(model, optimizer).values()}
    return after_load, steps


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_megatron_core_loads_megagrows_adam_state_and_keeps_training(tmp_path, precision):
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = _flags(data, 2, ["--train-iters", "2", "--save", str(tmp_path / "ckpt"),
                             "--metrics-file", str(tmp_path / "m.jsonl"), *precision])
    ours = run_distributed(_megagrow_trains_and_saves, 2, flags, 2)
    directory = str(tmp_path / "ckpt" / "iter_0000002")
    results = run_distributed(_megatron_core_loads_and_steps, 2, directory, 2, bool(precision), daemon=False)
    for rank, (after_load, steps) in enumerate(results):
        assert set(after_load) == set(ours[rank])
        for name, record in after_load.items():
            assert float(record["step"]) == 2.0
            for kind in MOMENTS:
                torch.testing.assert_close(record[kind], ours[rank][name][kind], rtol=0, atol=0)
            if precision:  # the fp32 masters behind the bf16 weights
                torch.testing.assert_close(record["fp32_param"], ours[rank][name]["master"], rtol=0, atol=0)
        assert steps == {3.0}


def _megatron_core_saves_distributed_optimizer(root, sharding):
    mc.initialize(1, 1)
    torch.manual_seed(11)
    model = mc.stage_model(CONFIG, 1, 1, 0)
    with mc.optimizer_cuda_shims():
        ddp, optimizer = mc.megatron_optimizer(model, distributed=True)
        for tokens in BATCHES:
            mc.train_step(ddp, optimizer, tokens)
        args = mc.megatron_lm_args(CONFIG, 1, 1, iteration=len(BATCHES), consumed_train_samples=4 * len(BATCHES),
                                   global_batch_size=4, ckpt_format="torch_dist")
        mc.save_like_megatron_lm(model, root, args=args, iteration=len(BATCHES), tp_rank=0, pp_rank=0, pp=1,
                                 ckpt_format="torch_dist", optimizer=optimizer, optimizer_sharding=sharding)
    return mc.adam_state(model, optimizer)


def test_megatron_lms_distributed_optimizer_in_model_space_is_read(tmp_path):
    # --dist-ckpt-optim-fully-reshardable: the distributed optimizer's state saved per parameter, masters as `param`.
    root = tmp_path / "ckpt"
    theirs = run_distributed(_megatron_core_saves_distributed_optimizer, 1, str(root), "fully_reshardable",
                             daemon=False)[0]
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = _flags(data, 1, ["--train-iters", "10", "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl")])
    iteration, params = run_distributed(_megagrow_loads, 1, flags, 1)[0]
    assert iteration == 2 and set(params) == set(theirs)
    for name, record in params.items():
        assert record["step"] == 2
        real = _real_rows(name, 0, record[MOMENTS[0]].shape[0])
        for kind in MOMENTS:
            torch.testing.assert_close(record[kind][real], theirs[name][kind][real], rtol=0, atol=0)


def test_megatron_lms_buffer_layout_adam_state_is_refused_in_one_line(tmp_path):
    # Megatron-LM's distributed optimizer saves dp_reshardable state by default: flat gradient-buffer ranges.
    root = tmp_path / "ckpt"
    run_distributed(_megatron_core_saves_distributed_optimizer, 1, str(root), "dp_reshardable", daemon=False)
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = _flags(data, 1, ["--train-iters", "10", "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl")])
    with pytest.raises(UserError, match="distributed optimizer in gradient-buffer layout.*--no-load-optim"):
        run_distributed(_megagrow_loads, 1, flags, 1)
    loaded = run_distributed(_megagrow_loads, 1, [*flags, "--no-load-optim"], 1)
    assert loaded[0][0] == 2


def test_stacking_a_megatron_run_stacks_its_adam_state(tmp_path, megatron_run):
    from fixtures_text import load_tool

    root, theirs = megatron_run
    stack = load_tool("stack_checkpoint").main
    stack(["--load", str(root), "--save", str(tmp_path / "grown"), "--growth-factor", "2", "--stack-optimizer-state",
           "--vocab-size", str(CONFIG.vocab_size), "--target-tensor-parallel-size", "2", "--no-progress-bar"])
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = [*_flags(data, 2, ["--train-iters", "10", "--load", str(tmp_path / "grown"),
                               "--metrics-file", str(tmp_path / "m.jsonl")]), "--ckpt-format", "torch"]
    flags[flags.index("--num-layers") + 1] = "4"
    loaded = run_distributed(_megagrow_loads, 2, flags, 2)
    for rank, (iteration, params) in enumerate(loaded):
        assert iteration == 2
        for grown_layer, base_layer in ((0, 0), (1, 1), (2, 0), (3, 1)):  # G_stack: layers 0 1 -> 0 1 0 1
            name = f"decoder.layers.{grown_layer}.mlp.linear_fc1.weight"
            base = f"decoder.layers.{base_layer}.mlp.linear_fc1.weight"
            assert params[name]["step"] == 2
            for kind in MOMENTS:
                torch.testing.assert_close(params[name][kind], theirs[rank][base][kind], rtol=0, atol=0)


def test_megagrow_resumes_with_megatron_lms_bf16_masters_from_the_torch_format(tmp_path):
    # Its mixed-precision optimizer nests the Adam state and keeps the fp32 masters beside it, group by group.
    root = tmp_path / "megatron"
    theirs = run_distributed(_megatron_core_trains_and_saves, 2, str(root), 2, "torch", True, daemon=False)
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = _flags(data, 2, ["--train-iters", "10", "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl"),
                             "--bf16"])
    loaded = run_distributed(_megagrow_loads, 2, flags, 2)
    for rank, (iteration, params) in enumerate(loaded):
        assert iteration == 2 and set(params) == set(theirs[rank])
        for name, record in params.items():
            real = _real_rows(name, rank, record[MOMENTS[0]].shape[0])
            assert record["step"] == 2
            for kind in MOMENTS:
                torch.testing.assert_close(record[kind][real], theirs[rank][name][kind][real], rtol=0, atol=0)
            torch.testing.assert_close(record["master"][real], theirs[rank][name]["fp32_param"][real], rtol=0, atol=0)
