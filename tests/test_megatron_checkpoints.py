"""Checkpoints shared with megatron-core 0.16.1 itself: it loads what megagrow writes, megagrow (training, conversion,
stacking) loads what it saves, in the torch and torch_dist formats, with equal logits in fp32."""

import os

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_core_harness as mc  # noqa: E402
from data_factory import random_documents, write_dataset  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from fixtures_text import load_tool  # noqa: E402
from trainer_runs import trainer_from_flags  # noqa: E402

from megagrow.checkpoint import names  # noqa: E402
from megagrow.checkpoint.layout import iteration_dir, shard_path  # noqa: E402
from megagrow.checkpoint.reader import MEGATRON, CheckpointReader  # noqa: E402
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded  # noqa: E402
from megagrow.config import ModelConfig, ParallelConfig  # noqa: E402
from megagrow.errors import UserError  # noqa: E402
from megagrow.growth import GrowthSpec, grow  # noqa: E402
from megagrow.model.llama import LlamaModel  # noqa: E402

convert = load_tool("convert_checkpoint").main
stack = load_tool("stack_checkpoint").main

CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=250, seq_length=16, make_vocab_size_divisible_by=8)
TOKENS = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length), generator=torch.Generator().manual_seed(0))
TOLERANCE = dict(atol=1e-5, rtol=0)


def _megagrow_logits(config: ModelConfig, state: dict, tokens=TOKENS) -> torch.Tensor:
    model = LlamaModel(config, ParallelConfig(), force_torch_kernels=True).eval()
    padded = {name: torch.cat([t, t.new_zeros(model.padded_vocab_size - t.size(0), t.size(1))])
              if name in (names.EMBEDDING, names.OUTPUT_LAYER) else t for name, t in state.items()}
    model.load_state_dict(padded, strict=True)
    with torch.no_grad():
        return model(tokens)


def _full_state(config: ModelConfig, seed: int = 3) -> dict:
    state = dict(LlamaModel(config, ParallelConfig(), seed=seed).state_dict())
    for name in (names.EMBEDDING, names.OUTPUT_LAYER):
        if name in state:
            state[name] = state[name][:config.vocab_size].clone()
    return state


# ---- megatron-core loads what megagrow writes ------------------------------------------------------


def _megatron_core_loads(root, config, tp, ckpt_format):
    mc.initialize(tp, 1)
    model = mc.gpt_model(config, tp)
    directory = iteration_dir(root, int(open(os.path.join(root, "latest_checkpointed_iteration.txt")).read()))
    if ckpt_format == "torch":
        rank = torch.distributed.get_rank()
        saved = torch.load(directory / f"mp_rank_{rank:02d}" / "model_optim_rng.pt", weights_only=False)
        model.load_state_dict(saved["model"], strict=True)
        args = saved["args"]
    else:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
        args = loaded.pop("args")
        for key in ("iteration", "checkpoint_version", "megagrow", "opt_param_scheduler", "optimizer",
                    "num_floating_point_operations_so_far"):
            loaded.pop(key, None)
        model.load_state_dict(loaded, strict=True)
    # What Megatron-LM's check_checkpoint_args and load_args_from_checkpoint read.
    recorded = (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups,
                args.tensor_model_parallel_size, args.padded_vocab_size, args.swiglu, args.normalization)
    return mc.logits(model, TOKENS, config.vocab_size), recorded


@pytest.mark.parametrize("tp, ckpt_format, tied", [
    (1, "torch", False), (2, "torch", False), (1, "torch_dist", True), (2, "torch_dist", False),
], ids=["tp1-torch", "tp2-torch", "tp1-torch_dist-tied", "tp2-torch_dist"])
def test_megatron_core_loads_megagrow_checkpoints(tmp_path, tp, ckpt_format, tied):
    config = CONFIG.replace(tie_embeddings=tied)
    state = _full_state(config)
    save_sharded(tmp_path / "ckpt", 5, config, reader_from_state_dict(state, config), tp=tp, pp=1, progress=False,
                 ckpt_format=ckpt_format)
    results = run_distributed(_megatron_core_loads, tp, str(tmp_path / "ckpt"), config, tp, ckpt_format, daemon=False)
    expected = _megagrow_logits(config, state)
    for logits, recorded in results:
        torch.testing.assert_close(logits, expected, **TOLERANCE)
        padded = -(-config.vocab_size // (8 * tp)) * 8 * tp
        assert recorded == (2, 64, 4, 2, tp, padded, True, "RMSNorm")


def _train_and_save(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        trainer.run()


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_megatron_core_loads_what_training_saves(tmp_path, ckpt_format):
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=CONFIG.vocab_size))
    flags = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--vocab-size", "250", "--make-vocab-size-divisible-by", "8",
             "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3", "--eval-interval", "0",
             "--log-interval", "100", "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "ckpt"),
             "--ckpt-format", ckpt_format, "--metrics-file", str(tmp_path / "metrics.jsonl")]
    run_distributed(_train_and_save, 2, flags, 2)
    reader = CheckpointReader(tmp_path / "ckpt")
    assert (reader.format, reader.iteration, reader.run_position().progress["consumed_samples"]) == (ckpt_format, 2, 8)
    results = run_distributed(_megatron_core_loads, 2, str(tmp_path / "ckpt"), CONFIG, 2, ckpt_format, daemon=False)
    expected = _megagrow_logits(CONFIG, reader.state_dict())
    for logits, _ in results:
        torch.testing.assert_close(logits, expected, **TOLERANCE)


# ---- megagrow loads what megatron-core saves ---------------------------------------------------------


def _megatron_core_saves(root, config, tp, pp, ckpt_format, iteration):
    mc.initialize(tp, pp)
    torch.manual_seed(11)  # every rank draws the same master weights and keeps its slice
    pp_rank = torch.distributed.get_rank() // tp
    model = mc.stage_model(config, tp, pp, pp_rank)
    args = mc.megatron_lm_args(config, tp, pp, iteration=iteration, consumed_train_samples=iteration * 8,
                               global_batch_size=8, ckpt_format=ckpt_format)
    mc.save_like_megatron_lm(model, root, args=args, iteration=iteration, tp_rank=torch.distributed.get_rank() % tp,
                             pp_rank=pp_rank, pp=pp, ckpt_format=ckpt_format)
    logits = mc.logits(model, TOKENS, config.vocab_size) if pp == 1 else None
    return logits, {name: tensor.clone() for name, tensor in model.state_dict().items() if tensor is not None}


@pytest.fixture(scope="module")
def megatron_checkpoints(tmp_path_factory):
    """Checkpoints megatron-core saved as Megatron-LM does: (root, logits or stage states) per layout and format."""
    made = {}
    for tp, pp, ckpt_format, tied in ((2, 1, "torch", False), (2, 1, "torch_dist", False), (1, 2, "torch", False),
                                      (1, 1, "torch_dist", True)):
        root = tmp_path_factory.mktemp(f"megatron_tp{tp}pp{pp}_{ckpt_format}")
        config = CONFIG.replace(tie_embeddings=tied)
        results = run_distributed(_megatron_core_saves, tp * pp, str(root), config, tp, pp, ckpt_format, 10,
                                  daemon=False)
        made[tp, pp, ckpt_format, tied] = (root, config, results)
    return made


@pytest.mark.parametrize("key", [(2, 1, "torch", False), (2, 1, "torch_dist", False), (1, 1, "torch_dist", True)],
                         ids=["tp2-torch", "tp2-torch_dist", "tp1-torch_dist-tied"])
def test_megagrow_reads_megatron_core_checkpoints_with_equal_logits(megatron_checkpoints, key):
    root, config, results = megatron_checkpoints[key]
    reader = CheckpointReader(root, vocab_size=config.vocab_size)
    assert (reader.origin, reader.format, reader.tp, reader.iteration) == (MEGATRON, key[2], key[0], 10)
    assert reader.config == config
    torch.testing.assert_close(_megagrow_logits(config, reader.state_dict()), results[0][0], **TOLERANCE)
    assert reader.run_position().progress == {"iteration": 10, "consumed_samples": 80, "skipped_steps": 0,
                                              "consecutive_skipped_steps": 0, "consumed_flops": 0.0}
    assert reader.run_position().scheduler_steps == 10


def test_pipeline_stages_are_renumbered_into_global_layers(megatron_checkpoints):
    root, config, results = megatron_checkpoints[1, 2, "torch", False]
    full = CheckpointReader(root, vocab_size=config.vocab_size).state_dict()
    (_, first), (_, last) = results
    assert torch.equal(full[names.layer_param_name(1, names.QKV)], last[names.layer_param_name(0, names.QKV)])
    assert torch.equal(full[names.layer_param_name(0, names.FC2)], first[names.layer_param_name(0, names.FC2)])
    assert torch.equal(full[names.OUTPUT_LAYER], last[names.OUTPUT_LAYER][:config.vocab_size])


def _evaluate_loaded(flags, world):
    with trainer_from_flags(flags, world) as trainer:
        return trainer.progress.iteration, trainer.progress.consumed_samples, trainer.optimization.current_lr()


def test_training_resumes_from_a_megatron_checkpoint(tmp_path, megatron_checkpoints):
    root, config, _ = megatron_checkpoints[2, 1, "torch", False]
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=config.vocab_size))
    flags = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--vocab-size", "250", "--make-vocab-size-divisible-by", "8",
             "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--train-iters", "100", "--lr", "3e-4", "--eval-interval", "0",
             "--tensor-model-parallel-size", "1", "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl")]
    with pytest.raises(UserError, match="its optimizer record holds no per-parameter Adam state.*--no-load-optim"):
        run_distributed(_evaluate_loaded, 1, flags, 1)
    # Loaded into another layout (tp=1 from tp=2): the iteration, data position and LR schedule carry over.
    iteration, consumed, lr = run_distributed(_evaluate_loaded, 1, [*flags, "--no-load-optim"], 1)[0]
    assert (iteration, consumed) == (10, 80)
    from megagrow.training.lr_schedule import LRScheduleConfig, learning_rate

    assert lr == pytest.approx(learning_rate(LRScheduleConfig(lr=3e-4, decay_samples=800, global_batch_size=8), 10))


def test_a_grown_megatron_checkpoint_carries_its_run_state(tmp_path, megatron_checkpoints):
    # README's first step: stack a Megatron-LM checkpoint with --carry-run-state, then keep training.
    root, config, _ = megatron_checkpoints[2, 1, "torch", False]
    stack(["--load", str(root), "--save", str(tmp_path / "grown"), "--growth-factor", "2", "--carry-run-state",
           "--vocab-size", str(config.vocab_size), "--target-tensor-parallel-size", "1", "--no-progress-bar"])
    data = write_dataset(tmp_path / "docs", random_documents(3, 200, 60, vocab_size=config.vocab_size))
    flags = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--vocab-size", "250", "--make-vocab-size-divisible-by", "8",
             "--seq-length", "16", "--data-path", data, "--split", "100,0,0", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--train-iters", "100", "--lr", "3e-4", "--eval-interval", "0",
             "--load", str(tmp_path / "grown"), "--metrics-file", str(tmp_path / "m.jsonl")]
    iteration, consumed, _ = run_distributed(_evaluate_loaded, 1, flags, 1)[0]
    assert (iteration, consumed) == (10, 80)  # a fresh optimizer, no --no-load-optim needed


def test_use_checkpoint_args_takes_the_model_from_a_megatron_checkpoint(tmp_path, megatron_checkpoints):
    from megagrow.arguments import parse_args

    root, config, _ = megatron_checkpoints[1, 1, "torch_dist", True]
    run = parse_args(["--use-checkpoint-args", "--load", str(root), "--mock-data", "--train-iters", "1",
                      "--vocab-size", str(config.vocab_size)])
    assert run.model == config
    with pytest.raises(UserError, match="--use-checkpoint-args takes the model from --load"):
        parse_args(["--use-checkpoint-args", "--mock-data", "--train-iters", "1"])


def test_hf_export_and_growth_of_a_megatron_checkpoint(tmp_path, megatron_checkpoints):
    root, config, results = megatron_checkpoints[2, 1, "torch_dist", False]
    # G_stack of a Megatron checkpoint: the grown model is grow() of its weights, and megatron-core loads it.
    stack(["--load", str(root), "--save", str(tmp_path / "grown"), "--growth-factor", "2",
           "--target-tensor-parallel-size", "2", "--vocab-size", str(config.vocab_size), "--no-progress-bar"])
    base = CheckpointReader(root, vocab_size=config.vocab_size).state_dict()
    expected, grown_config = grow(base, config, GrowthSpec("depth:stack", factor=2))
    grown = CheckpointReader(tmp_path / "grown")
    assert grown.config == grown_config and grown.origin == "megagrow"
    assert all(torch.equal(grown.state_dict()[name], tensor) for name, tensor in expected.items())
    results = run_distributed(_megatron_core_loads, 2, str(tmp_path / "grown"), grown_config, 2, "torch", daemon=False)
    torch.testing.assert_close(results[0][0], _megagrow_logits(grown_config, expected), **TOLERANCE)
    # Back to HF: transformers gives megatron-core's logits.
    transformers = pytest.importorskip("transformers")
    convert(["to-hf", "--load", str(root), "--save", str(tmp_path / "hf"), "--vocab-size", str(config.vocab_size)])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, megatron_checkpoints[2, 1, "torch_dist", False][2][0][0],
                                   atol=1e-4, rtol=0)


# ---- what cannot be represented is refused ----------------------------------------------------------


def _rewrite_legacy_shard(root, change):
    for path in root.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        record = torch.load(path, weights_only=False)
        change(record)
        torch.save(record, path)


@pytest.mark.parametrize("what, change, message", [
    ("biases", lambda r: setattr(r["args"], "add_bias_linear", True), "biases"),
    ("LayerNorm", lambda r: setattr(r["args"], "normalization", "LayerNorm"), "normalization LayerNorm"),
    ("MoE", lambda r: setattr(r["args"], "num_experts", 8), "mixture of experts"),
    ("scaled RoPE", lambda r: setattr(r["args"], "use_rope_scaling", True), "scaled RoPE"),
    ("a bias tensor", lambda r: r["model"].update({"decoder.layers.0.mlp.linear_fc2.bias": torch.zeros(64)}),
     "decoder.layers.0.mlp.linear_fc2.bias"),
    ("code", lambda r: r.update(evil=_RunsCode()), "refused, it would import 'posix.system'"),
])
def test_unrepresentable_or_unsafe_megatron_checkpoints_are_refused_in_one_line(tmp_path, megatron_checkpoints,
                                                                                what, change, message, capsys):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(megatron_checkpoints[1, 2, "torch", False][0], root)
    _rewrite_legacy_shard(root, change)
    with pytest.raises(SystemExit):
        convert(["to-hf", "--load", str(root), "--save", str(tmp_path / "hf")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "pwned.txt").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_transformer_engine_names_are_read_as_the_local_specs(tmp_path, megatron_checkpoints):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(megatron_checkpoints[1, 2, "torch", False][0], root)

    def to_te_names(record):
        te = {}
        for name, value in record["model"].items():
            for local, fused in names.LOCAL_TO_TE.items():
                name = name.replace(local, fused)
            te[name] = value
        record["model"] = te

    _rewrite_legacy_shard(root, to_te_names)
    assert any("layer_norm_weight" in k for k in torch.load(shard_path(root, 10, 0, 0, 2), weights_only=False)["model"])
    original = CheckpointReader(megatron_checkpoints[1, 2, "torch", False][0], vocab_size=250).state_dict()
    renamed = CheckpointReader(root, vocab_size=250).state_dict()
    assert all(torch.equal(renamed[name], tensor) for name, tensor in original.items())


def test_a_megatron_checkpoint_whose_args_and_weights_disagree_is_refused(tmp_path, megatron_checkpoints):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(megatron_checkpoints[1, 2, "torch", False][0], root)
    _rewrite_legacy_shard(root, lambda r: setattr(r["args"], "ffn_hidden_size", 128))
    with pytest.raises(UserError, match="linear_fc1.weight has shape"):
        CheckpointReader(root, vocab_size=250)
