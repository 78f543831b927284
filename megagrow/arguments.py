"""Megatron-style command-line flags (and `--config file.yaml`) turned into validated configs.

Precedence, lowest first: ModelConfig defaults, `--model-preset`, the YAML file, explicit
flags. YAML keys are the flag names with underscores (`num_layers: 4`). Megatron flags
that only restate what a Llama model is (`--swiglu`, `--normalization RMSNorm`, ...) are
accepted so existing launch scripts run; values megagrow cannot honour are refused. The
kernel, logging and feature flags of stock Megatron scripts are in megagrow/megatron_flags.py:
each is followed (accepted, --help says how) or refused with one line saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass

from megagrow.config import (DataConfig, ModelConfig, ParallelConfig, TrainConfig, model_preset, num_parameters,
                             validate_parallel)
from megagrow.errors import UserError
from megagrow.megatron_flags import add_megatron_flags, check_megatron_flags, samples_to_iterations
from megagrow.model.recompute import LayerRecompute
from megagrow.training.lr_schedule import DECAY_STYLES, WD_INCR_STYLES, WSD_DECAY_STYLES
from megagrow.parallel.pipeline import partition_layers

logger = logging.getLogger("megagrow")

# flag dest -> ModelConfig field (where the names differ)
_MODEL_FIELDS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "seq_length": "seq_length", "max_position_embeddings": "max_position_embeddings",
    "vocab_size": "vocab_size", "rotary_base": "rope_theta", "norm_epsilon": "norm_eps",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by", "init_method_std": "init_method_std",
}


@dataclass
class RunConfig:
    """Everything a training run is configured by."""

    model: ModelConfig
    parallel: ParallelConfig
    train: TrainConfig
    data: DataConfig
    tokenizer_type: str = "SentencePieceTokenizer"


def _positive_minutes(text: str) -> float:
    """Minutes as Megatron's --distributed-timeout-minutes, also fractional (0.5 = 30 s)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def _token_count(text: str) -> int:
    """A whole number of tokens, also written like 10e9 or 2.5e11."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of tokens")
    return int(value)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad or unknown flag is a UserError (one line) instead of the whole usage text."""

    def error(self, message):
        raise UserError(f"{message} (pretrain_gpt.py --help lists the flags)")


def launch_settings(argv: list[str] | None = None) -> tuple[str | None, float]:
    """(--distributed-backend, --distributed-timeout-minutes), read before the other flags.

    pretrain_gpt.py creates the process group from them first, so that every later mistake,
    a bad flag included, is reported once per job rather than once per rank. Mistakes in these
    two are left for parse_args to report.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--distributed-backend")
    parser.add_argument("--distributed-timeout-minutes")
    known, _ = parser.parse_known_args(argv)
    values = {}
    if known.config:
        try:
            values = _read_yaml(known.config)
        except UserError:
            pass
    backend = known.distributed_backend or values.get("distributed_backend")
    minutes = known.distributed_timeout_minutes or values.get("distributed_timeout_minutes")
    try:
        minutes = _positive_minutes(str(minutes))
    except argparse.ArgumentTypeError:
        minutes = TrainConfig.distributed_timeout_minutes
    return (backend if backend in ("nccl", "gloo") else None), minutes


def build_parser() -> argparse.ArgumentParser:
    """The pretrain_gpt.py argument parser (every default None, so set flags can be told apart)."""
    p = _OneLineErrorParser(description="Pre-train a Llama model (Megatron-style flags)", argument_default=None)
    p.add_argument("--config", help="YAML file of settings (keys are flag names with underscores)")
    p.add_argument("--model-preset", help="start from a named architecture: tinyllama-1.1b, llama2-7b, tiny, small-cpu")
    g = p.add_argument_group("model")
    for flag, kind in (("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
                       ("--num-attention-heads", int), ("--num-query-groups", int), ("--seq-length", int),
                       ("--max-position-embeddings", int), ("--vocab-size", int), ("--rotary-base", float),
                       ("--norm-epsilon", float), ("--make-vocab-size-divisible-by", int),
                       ("--init-method-std", float)):
        g.add_argument(flag, type=kind)
    g.add_argument("--num-key-value-heads", type=int, help="Megatron-DeepSpeed's name for --num-query-groups")
    g.add_argument("--untie-embeddings-and-output-weights", dest="tie_embeddings", action="store_false", default=None,
                   help="separate output head (Llama's default here)")
    g.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None,
                   help="share embedding and head")
    g = p.add_argument_group("Megatron flags that restate the Llama architecture (accepted, checked)")
    for flag in ("--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings", "--no-position-embedding",
                 "--group-query-attention", "--use-flash-attn", "--no-masked-softmax-fusion"):
        g.add_argument(flag, action="store_true")
    g.add_argument("--normalization", help="RMSNorm (any case, e.g. Megatron-DeepSpeed's rmsnorm); LayerNorm is refused")
    g.add_argument("--position-embedding-type")
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int)
    g.add_argument("--pipeline-model-parallel-size", type=int)
    g.add_argument("--sequence-parallel", action="store_true", help="with tp=1 it is turned off, as in Megatron-LM")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true", default=None,
                   help="megagrow's default: the dp gradient reduction overlaps the backward pass")
    g.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false", default=None)
    g.add_argument("--pipeline-layer-split", type=int, nargs="+", help="layers per stage, e.g. 5 6 6 5")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], help="default: nccl with CUDA, else gloo")
    g.add_argument("--distributed-timeout-minutes", type=_positive_minutes,
                   help="timeout of every collective (default 10, as Megatron; fractions allowed, e.g. 0.5): a "
                        "stuck or lost rank stops the job with one line after it instead of hanging")
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    g = p.add_argument_group("DeepSpeed (ZeRO); DeepSpeed's own argument names")
    g.add_argument("--deepspeed", action="store_true", help="let the DeepSpeed engine reduce, shard and update")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", help="DeepSpeed json")
    g.add_argument("--zero-stage", "--zero_stage", dest="zero_stage", type=int, choices=[0, 1, 2, 3],
                   help="overrides zero_optimization.stage of the json")
    g = p.add_argument_group("training")
    for flag, kind in (("--micro-batch-size", int), ("--global-batch-size", int), ("--train-iters", int),
                       ("--train-tokens", _token_count), ("--lr", float), ("--min-lr", float), ("--lr-warmup-iters", int),
                       ("--lr-decay-iters", int), ("--weight-decay", float), ("--clip-grad", float),
                       ("--adam-beta1", float), ("--adam-beta2", float), ("--adam-eps", float), ("--seed", int),
                       ("--max-consecutive-skipped-steps", int), ("--peak-tflops", float),
                       ("--initial-loss-scale", float), ("--min-loss-scale", float), ("--loss-scale-window", int),
                       ("--hysteresis", int)):
        g.add_argument(flag, type=kind)
    g.add_argument("--lr-decay-style", choices=list(DECAY_STYLES),
                   help="after warm-up (default cosine); WSD: stable, then annealed over --lr-wsd-decay-iters")
    g.add_argument("--lr-warmup-init", type=float, help="learning rate of the first warm-up step (default 0)")
    g.add_argument("--lr-wsd-decay-style", choices=list(WSD_DECAY_STYLES),
                   help="shape of WSD's annealing phase (default exponential)")
    g.add_argument("--lr-wsd-decay-iters", type=int, help="length of WSD's annealing phase, at the end of the decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, help="as --lr-wsd-decay-iters, in samples of whole batches")
    g.add_argument("--start-weight-decay", type=float, help="weight decay at the start (with an increment style)")
    g.add_argument("--end-weight-decay", type=float, help="weight decay at the end of the run")
    g.add_argument("--weight-decay-incr-style", choices=list(WD_INCR_STYLES),
                   help="how weight decay rises from start to end (default constant: --weight-decay throughout)")
    g.add_argument("--optimizer", help="adam: AdamW with decoupled weight decay, as Megatron's adam (sgd is refused)")
    g.add_argument("--train-samples", type=int, help="run length in samples (a whole number of global batches)")
    g.add_argument("--lr-decay-samples", type=int, help="as --lr-decay-iters, in samples of whole global batches")
    g.add_argument("--lr-warmup-samples", type=int, help="as --lr-warmup-iters, in samples of whole global batches")
    g.add_argument("--lr-warmup-fraction", type=float,
                   help="warm-up as a fraction of the decay (need not be a whole number of iterations)")
    g.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights and gradient accumulation")
    g.add_argument("--fp16", action="store_true", help="fp16 compute with dynamic loss scaling, fp32 master weights")
    g = p.add_argument_group("memory and speed (results unchanged)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="recompute each decoder layer (full) or only core attention (selective) in backward")
    g.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="with full: uniform recomputes chunks of --recompute-num-layers layers; block recomputes "
                        "only the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, help="layers per chunk (uniform) or per stage (block); default 1")
    g.add_argument("--recompute-activations", action="store_true", help="Megatron's shorthand for selective")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="Megatron-DeepSpeed's shorthand for full, uniform, --checkpoint-num-layers per chunk")
    g.add_argument("--checkpoint-num-layers", type=int, help="chunk size for --checkpoint-activations (default 1)")
    g.add_argument("--cross-entropy-chunk-size", type=int,
                   help="compute the output head and loss this many tokens at a time (0: all at once)")
    g.add_argument("--compile-mlp", action="store_true", help="fuse the SwiGLU gate with torch.compile")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="a dataset prefix, or weight/prefix pairs, or @mix.txt")
    g.add_argument("--split")
    g.add_argument("--tokenizer-type")
    g.add_argument("--tokenizer-model")
    g.add_argument("--data-cache-path")
    g.add_argument("--num-workers", type=int)
    g.add_argument("--mock-data", action="store_true", help="random tokens (smoke tests, benchmarks)")
    g.add_argument("--blend-rule", help="blend order: megatron (megatron-core's samples, default) or tijdeman")
    g.add_argument("--dataloader-type", help="single: the samples in order; cyclic: Megatron's random sampler, a new "
                                             "permutation every epoch (training data; evaluation reads in order)")
    g.add_argument("--no-data-sharding", dest="data_sharding", action="store_false", default=None,
                   help="cyclic: permute the whole epoch, not each data-parallel rank's bucket")
    g = p.add_argument_group("model growth (G_stack during the run)")
    g.add_argument("--grow-at-tokens", type=_token_count, help="save at this many tokens, grow in depth, continue")
    g.add_argument("--growth-factor", type=int, help="layers x this factor (default 4)")
    g.add_argument("--growth-operator", help="depth operator of megagrow/growth (default depth:stack)")
    g.add_argument("--stack-optimizer-state", action="store_true", help="stack the Adam moments too (else fresh)")
    g = p.add_argument_group("checkpoints and logging")
    for flag, kind in (("--save", str), ("--load", str), ("--save-interval", int), ("--eval-interval", int),
                       ("--eval-iters", int), ("--log-interval", int), ("--tensorboard-dir", str),
                       ("--metrics-file", str), ("--exit-interval", int)):
        g.add_argument(flag, type=kind)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true", help="save the weights without the optimizer state")
    g.add_argument("--no-save-rng", action="store_true", help="save without the RNG states")
    g.add_argument("--ckpt-format", help="torch (megagrow's default) or torch_dist")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's architecture from the --load checkpoint")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load holding no checkpoint: stop with an error instead of training from scratch")
    g.add_argument("--exit-signal-handler", action="store_true", help="accepted; SIGTERM always saves and exits")
    add_megatron_flags(p)
    return p


def _explicit(namespace: argparse.Namespace) -> dict:
    """Flags the user set: store_true flags count only when True, others when not None."""
    flags_that_may_be_false = {"tie_embeddings", "overlap_grad_reduce", "data_sharding"}
    return {k: v for k, v in vars(namespace).items()
            if v is not None and (v is not False or k in flags_that_may_be_false)}


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, found {type(values).__name__}")
    known = {a.dest for a in build_parser()._actions}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise UserError(f"--config {path}: unknown settings {', '.join(unknown)}; use the flag names with underscores")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _check_llama_flags(v: dict) -> None:
    if v.get("normalization", "RMSNorm").lower() != "rmsnorm":
        raise UserError(f"--normalization {v['normalization']}: megagrow builds Llama models, which use RMSNorm")
    if v.get("position_embedding_type", "rope") != "rope":
        raise UserError(f"--position-embedding-type {v['position_embedding_type']}: Llama models use rope")
    for name in ("attention_dropout", "hidden_dropout"):
        if v.get(name, 0.0) != 0.0:
            raise UserError(f"--{name.replace('_', '-')} {v[name]}: dropout is not supported (Llama pre-training uses none)")
    if v.get("bf16") and v.get("fp16"):
        raise UserError("--bf16 and --fp16 both given; choose one precision")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse flags (plus YAML and preset) into a validated RunConfig, or raise UserError with one line."""
    namespace = build_parser().parse_args(argv)
    values = _explicit(namespace)
    if "config" in values:
        values = {**_read_yaml(values["config"]), **values}
    check_megatron_flags(values)
    values = _megatron_synonyms(samples_to_iterations(values))
    _check_llama_flags(values)

    if values.get("use_checkpoint_args"):
        values = _with_checkpoint_model(values)
    model_fields = {field: values[flag] for flag, field in _MODEL_FIELDS.items() if flag in values}
    if "tie_embeddings" in values:
        model_fields["tie_embeddings"] = values["tie_embeddings"]
    _vocab_from_tokenizer(values, model_fields)
    _require_vocabulary(values)
    if "model_preset" in values:
        model = model_preset(values["model_preset"], **model_fields)
    else:
        required = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
        missing = [f"--{name.replace('_', '-')}" for name in required if name not in model_fields]
        if missing:
            raise UserError(f"model shape not given: pass {', '.join(missing)} or --model-preset NAME")
        model_fields.setdefault("ffn_hidden_size", 4 * model_fields["hidden_size"])
        model_fields.setdefault("vocab_size", 32000)
        model = ModelConfig(**model_fields)
    if values.get("kv_channels", model.head_dim) != model.head_dim:
        raise UserError(f"--kv-channels {values['kv_channels']}: megagrow's head dimension is --hidden-size / "
                        f"--num-attention-heads = {model.head_dim}; drop --kv-channels or make them agree")

    tp = values.get("tensor_model_parallel_size", 1)
    pp = values.get("pipeline_model_parallel_size", 1)
    world = _world_size()
    if world % (tp * pp):
        raise UserError(f"world size {world} is not divisible by tensor x pipeline parallel size {tp} x {pp}; "
                        f"launch a multiple of {tp * pp} processes")
    sequence_parallel = values.get("sequence_parallel", False)
    if sequence_parallel and tp == 1:
        logger.warning("--sequence-parallel with --tensor-model-parallel-size 1 has nothing to split: turned off, "
                       "as Megatron-LM does")
        sequence_parallel = False
    parallel = ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp), sequence_parallel=sequence_parallel)
    split = values.get("pipeline_layer_split")
    partition_layers(model.num_layers, pp, split)  # refuses an impossible split with one line
    validate_parallel(model, parallel)

    precision = "bf16" if values.get("bf16") else "fp16" if values.get("fp16") else "fp32"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(precision=precision, pipeline_layer_split=split,
                        **{k: v for k, v in values.items() if k in train_fields and k not in ("precision", "pipeline_layer_split")})
    LayerRecompute.from_flags(train.recompute_granularity, train.recompute_method, train.recompute_num_layers)
    per_step = train.micro_batch_size * parallel.dp
    if train.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {train.global_batch_size} is not divisible by --micro-batch-size "
                        f"{train.micro_batch_size} x data-parallel size {parallel.dp}; make it a multiple of {per_step}")
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in values.items() if k in data_fields})
    tokenizer_type = values.get("tokenizer_type", "SentencePieceTokenizer")
    return RunConfig(model, parallel, train, data, tokenizer_type)


def _with_checkpoint_model(values: dict) -> dict:
    """--use-checkpoint-args: the model flags not given take the values --load's checkpoint records (as Megatron-LM)."""
    from megagrow.checkpoint.reader import recorded_model_config

    if not values.get("load"):
        raise UserError("--use-checkpoint-args takes the model from --load's checkpoint; add --load DIR")
    recorded = recorded_model_config(values["load"])
    if recorded is None:
        logger.warning("--use-checkpoint-args: %s holds no checkpoint yet; using the flags given", values["load"])
        return values
    from_checkpoint = {flag: getattr(recorded, field) for flag, field in _MODEL_FIELDS.items()}
    from_checkpoint["tie_embeddings"] = recorded.tie_embeddings
    if values.get("tokenizer_model"):
        del from_checkpoint["vocab_size"]  # the tokenizer knows it (Megatron's args often hold only the padded size)
    taken = {flag: value for flag, value in from_checkpoint.items() if flag not in values and value is not None}
    logger.info("--use-checkpoint-args: model settings from %s: %s", values["load"],
                ", ".join(f"{flag}={value}" for flag, value in sorted(taken.items())))
    return {**values, **taken}


def _megatron_synonyms(values: dict) -> dict:
    """Megatron's other names for megagrow settings, resolved (and refused when they contradict)."""
    values = dict(values)
    kv_heads = values.pop("num_key_value_heads", None)
    if kv_heads is not None:
        if values.setdefault("num_query_groups", kv_heads) != kv_heads:
            raise UserError(f"--num-key-value-heads {kv_heads} and --num-query-groups {values['num_query_groups']} "
                            f"name the same setting; give one, or make them agree")
    chunk = values.pop("checkpoint_num_layers", None)
    shorthands = []
    if values.pop("recompute_activations", False):
        shorthands.append(("--recompute-activations", {"recompute_granularity": "selective"}))
    if values.pop("checkpoint_activations", False):
        shorthands.append(("--checkpoint-activations", {"recompute_granularity": "full", "recompute_method": "uniform",
                                                        "recompute_num_layers": chunk or 1}))
    elif chunk is not None:
        raise UserError("--checkpoint-num-layers applies to --checkpoint-activations; use --recompute-num-layers")
    for flag, settings in shorthands:
        for name, value in settings.items():
            if values.setdefault(name, value) != value:
                raise UserError(f"{flag} means --{name.replace('_', '-')} {value}, but {values[name]} is also given; "
                                f"drop one")
    return values


def _vocab_from_tokenizer(values: dict, model_fields: dict) -> None:
    """The model's vocabulary is the tokenizer's (Megatron builds the tokenizer to size the embedding)."""
    from megagrow.data.tokenizer import NULL_TYPE, build_tokenizer, check_tokenizer_type

    tokenizer_type = values.get("tokenizer_type", "SentencePieceTokenizer")
    check_tokenizer_type(tokenizer_type)
    if tokenizer_type == NULL_TYPE:
        # --vocab-size ids and one eod id after them, as Megatron's NullTokenizer.
        model_fields["vocab_size"] = build_tokenizer(NULL_TYPE, None, values.get("vocab_size")).vocab_size
    elif values.get("tokenizer_model"):
        tokenizer_vocab = build_tokenizer(tokenizer_type, values["tokenizer_model"]).vocab_size
        if model_fields.setdefault("vocab_size", tokenizer_vocab) != tokenizer_vocab:
            raise UserError(f"--vocab-size {model_fields['vocab_size']} differs from the {tokenizer_vocab} tokens of "
                            f"--tokenizer-model {values['tokenizer_model']}; drop --vocab-size to use the tokenizer's")


def _require_vocabulary(values: dict) -> None:
    """Real data must come with the vocabulary it was tokenized with (Megatron requires a tokenizer)."""
    if values.get("mock_data") or not values.get("data_path"):
        return
    if values.get("tokenizer_model") or "vocab_size" in values or values.get("use_checkpoint_args"):
        return
    raise UserError("--data-path without --tokenizer-model or --vocab-size: the model's vocabulary must be the one the "
                    "data was tokenized with; pass --tokenizer-model (the tokenizer given to tools/preprocess_data.py) "
                    "or --vocab-size N (a preset's or the default 32000 would only be a guess)")


def _warmup(train: TrainConfig) -> str:
    if train.lr_warmup_fraction is not None:
        return f"{train.lr_warmup_fraction:g} of the decay"
    return f"{train.lr_warmup_iters}"


def describe(config: RunConfig) -> list[str]:
    """The run's settings for the start-up log: one line per fact, none for features the run does not use."""
    model, parallel, train, data = config.model, config.parallel, config.train, config.data
    lines = [f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
             f"({model.query_groups} KV groups), FFN {model.ffn_hidden_size}, vocabulary {model.vocab_size}, "
             f"sequence {model.seq_length}, {num_parameters(model) / 1e6:.1f}M parameters"]
    extras = [name for name, on in (("sequence parallel", parallel.sequence_parallel),
                                    ("distributed optimizer", train.use_distributed_optimizer)) if on]
    lines.append(f"parallel: tp={parallel.tp} pp={parallel.pp} dp={parallel.dp} ({parallel.world_size} "
                 f"process{'es' if parallel.world_size > 1 else ''})"
                 + "".join(f", {extra}" for extra in extras))
    length = f"{train.train_iters} iterations" if train.train_iters is not None else f"{train.train_tokens} tokens"
    backend = f", DeepSpeed ZeRO-{train.zero_stage}" if train.deepspeed and train.zero_stage is not None else (
        ", DeepSpeed" if train.deepspeed else "")
    lines.append(f"training: {length} of {train.global_batch_size} x {model.seq_length} tokens (micro-batch "
                 f"{train.micro_batch_size}), lr {train.lr:g} -> {train.min_lr:g} {train.lr_decay_style}, warm-up "
                 f"{_warmup(train)}, {train.precision}{backend}")
    if data.mock_data:
        lines.append("data: random tokens (--mock-data)")
    else:
        source = " ".join(data.data_path) if len(data.data_path) <= 4 else f"{len(data.data_path) // 2} datasets"
        lines.append(f"data: {source}, split {data.split}")
    if train.grow_at_tokens:
        lines.append(f"growth: x{train.growth_factor} ({train.growth_operator}) at {train.grow_at_tokens} tokens")
    if train.save or train.load:
        interval = f" every {train.save_interval} iterations" if train.save_interval else ""
        lines.append(f"checkpoints: save {train.save or '-'}{interval}, load {train.load or '-'}")
    return lines
