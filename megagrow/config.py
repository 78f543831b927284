"""Configuration dataclasses, named presets, and the parameter / FLOP arithmetic derived from them.

`ModelConfig` describes a Llama architecture, `ParallelConfig` how it is split over ranks,
`TrainConfig` how it is trained and `DataConfig` where its tokens come from.
Both validate on construction, so a bad combination fails at start-up with one line
naming the field, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from megagrow.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama architecture: pre-norm RMSNorm blocks, RoPE, grouped-query attention, SwiGLU."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    # None means multi-head attention: one key/value head per query head.
    num_query_groups: int | None = None
    # None means seq_length: RoPE tables are built this long.
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Megatron's default; the padded vocabulary is a multiple of this times tp (see padded_vocab_size).
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    params_dtype: str = "float32"

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise UserError(f"model config: head dimension {self.head_dim} must be even for RoPE")
        groups = self.query_groups
        if groups < 1 or self.num_attention_heads % groups:
            raise UserError(f"model config: num_attention_heads {self.num_attention_heads} is not divisible by "
                            f"num_query_groups {groups}")
        if self.max_positions < self.seq_length:
            raise UserError(f"model config: max_position_embeddings {self.max_positions} is shorter than "
                            f"seq_length {self.seq_length}")
        if self.params_dtype not in _DTYPES:
            raise UserError(f"model config: params_dtype {self.params_dtype!r} is not one of {sorted(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Number of key/value heads (equal to the query heads for multi-head attention)."""
        return self.num_attention_heads if self.num_query_groups is None else self.num_query_groups

    @property
    def max_positions(self) -> int:
        """Longest sequence the position tables cover."""
        return self.seq_length if self.max_position_embeddings is None else self.max_position_embeddings

    @property
    def torch_dtype(self) -> torch.dtype:
        """`params_dtype` as a torch dtype."""
        return _DTYPES[self.params_dtype]

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are split: tensor (tp), pipeline (pp) and data (dp) parallel sizes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    # Split activations outside the tensor-parallel regions along the sequence (needs tp > 1 to matter).
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel config: {name} must be positive, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        """Number of ranks this layout needs."""
        return self.tp * self.pp * self.dp


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of `make_vocab_size_divisible_by * tp`, so every shard is equal."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def validate_parallel(config: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise UserError when the model cannot be split as `parallel` asks."""
    tp = parallel.tp
    if config.num_attention_heads % tp:
        raise UserError(f"num_attention_heads {config.num_attention_heads} is not divisible by tensor-parallel "
                        f"size {tp}; choose a tp that divides it")
    # Key/value heads are split over tp ranks, never replicated: a kv head copied on several
    # ranks would need its gradients summed across them and would break the layout the
    # checkpoint converters and growth tools rely on.
    if config.query_groups % tp:
        raise UserError(f"num_query_groups {config.query_groups} is not divisible by tensor-parallel size {tp}; "
                        f"use tp <= {config.query_groups} that divides it")
    if config.ffn_hidden_size % tp:
        raise UserError(f"ffn_hidden_size {config.ffn_hidden_size} is not divisible by tensor-parallel size {tp}")
    if parallel.sequence_parallel and config.seq_length % tp:
        raise UserError(f"sequence parallelism needs seq_length {config.seq_length} divisible by tensor-parallel "
                        f"size {tp}")


def num_parameters(config: ModelConfig) -> int:
    """Trainable parameters of the unsharded model, counted with the unpadded vocabulary."""
    h, kv = config.hidden_size, config.query_groups * config.head_dim
    attention = 2 * h * h + 2 * h * kv  # q and output projections; k and v projections
    mlp = 3 * h * config.ffn_hidden_size  # gate, up, down
    norms = 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
    return config.num_layers * (attention + mlp + norms) + embeddings + h


def training_flops_per_token(config: ModelConfig, seq_length: int | None = None) -> int:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * h * s.

    6 * N: each weight in a matmul costs 2 FLOPs per token forward and 4 backward. N counts
    the weights that take part in matmuls, so the input embedding (a lookup) is left out
    unless it is tied to the output head. 12 * L * h * s: per layer, QK^T and attention-times-V
    each cost 2 * s * h FLOPs per token forward, times 3 for training. The causal mask is not
    credited (as in PaLM's MFU accounting), so utilisation figures compare across codebases.
    """
    s = config.seq_length if seq_length is None else seq_length
    matmul_params = num_parameters(config)
    if not config.tie_embeddings:
        matmul_params -= config.vocab_size * config.hidden_size
    return 6 * matmul_params + 12 * config.num_layers * config.hidden_size * s


def _tinyllama_1_1b() -> ModelConfig:
    return ModelConfig(num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32,
                       num_query_groups=4, vocab_size=32000, seq_length=2048, rope_theta=10000.0, norm_eps=1e-5,
                       tie_embeddings=False)


def _llama2_7b() -> ModelConfig:
    return ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                       vocab_size=32000, seq_length=4096, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)


def _tiny() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                       vocab_size=1024, seq_length=64, make_vocab_size_divisible_by=8)


def _small_cpu() -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8, num_query_groups=4,
                       vocab_size=8000, seq_length=256, make_vocab_size_divisible_by=64)


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tinyllama-1.1b": _tinyllama_1_1b,
    "llama2-7b": _llama2_7b,
    "tiny": _tiny,
    "small-cpu": _small_cpu,
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with any fields in `overrides` replaced."""
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(MODEL_PRESETS))}")
    return MODEL_PRESETS[name]().replace(**overrides)


PRECISIONS = ("fp32", "bf16", "fp16")
DATALOADER_TYPES = ("single", "cyclic")
CHECKPOINT_FORMATS = ("torch", "torch_dist")


@dataclass
class TrainConfig:
    """How to train: batch, schedule, optimizer, precision, checkpoints and logging (Megatron's flag names)."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int | None = None
    train_tokens: int | None = None  # alternative to train_iters; converted with the batch and seq length
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None  # warm-up as a fraction of the decay (wins over lr_warmup_iters)
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None  # None: decay over the whole run
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: int | None = None  # WSD: length of the final annealing phase
    lr_wsd_decay_style: str = "exponential"
    weight_decay: float = 0.1
    # Weight decay rising over the run (Megatron's); "constant" keeps weight_decay throughout.
    start_weight_decay: float | None = None
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = "constant"
    # The whole run's length when this config is one phase of it (in-run growth), so that the
    # schedules span the run; None: train_iters.
    run_iters: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "fp32"
    # fp16 dynamic loss scaling (Megatron's flags and defaults).
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    seed: int = 1234
    use_distributed_optimizer: bool = False
    # Megatron's --optimizer: "adam" is AdamW with decoupled weight decay, the one megagrow has.
    optimizer: str = "adam"
    # Process groups (pretrain_gpt.py -> megagrow.parallel.state.initialize): None picks nccl with
    # CUDA, else gloo; every collective fails after the timeout instead of hanging (Megatron's 10).
    distributed_backend: str | None = None
    distributed_timeout_minutes: float = 10  # fractions allowed (tests bound a stuck rank in seconds)
    # DeepSpeed engine instead of megagrow's optimizer path (DeepSpeed's own flag names).
    deepspeed: bool = False
    deepspeed_config: str | None = None
    zero_stage: int | None = None  # overrides zero_optimization.stage of the json
    overlap_grad_reduce: bool = True
    # Explicit layers per pipeline stage, e.g. [5, 6, 6, 5]; None splits evenly.
    pipeline_layer_split: list[int] | None = None
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    # Checkpoint flags as Megatron-LM's (honoured by megagrow/training/checkpoint_state.py):
    ckpt_format: str = "torch"  # "torch" (per-rank model_optim_rng.pt) or "torch_dist"
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    use_checkpoint_args: bool = False  # take the model's shape from --load's args (arguments.py)
    # --load naming a directory with no checkpoint stops the run instead of starting fresh.
    exit_on_missing_checkpoint: bool = False
    eval_interval: int | None = 1000
    eval_iters: int = 10
    log_interval: int = 100
    tensorboard_dir: str | None = None
    metrics_file: str | None = None  # default: {save}/metrics.jsonl, else runs/metrics.jsonl
    max_consecutive_skipped_steps: int = 10
    peak_tflops: float | None = None  # per-device peak for MFU; default from the device table
    exit_on_signal: bool = True  # SIGTERM/SIGINT: save a checkpoint at the end of the iteration, then exit
    # Megatron's --exit-interval: save and stop at the first iteration divisible by it, so a run can be
    # cut into legs (e.g. train a base to the growth point) without changing the LR schedule.
    exit_interval: int | None = None
    # Grow the model in depth once this many tokens are consumed, then continue (megagrow/growth/in_run.py).
    grow_at_tokens: int | None = None
    growth_factor: int = 4
    growth_operator: str = "depth:stack"
    stack_optimizer_state: bool = False  # carry Adam moments through the growth, stacked like the weights
    # Speed options that leave the result unchanged (megagrow/model: recompute.py, chunked_loss.py,
    # swiglu.py); LlamaModel validates them.
    recompute_granularity: str | None = None  # "full" or "selective"
    recompute_method: str | None = None  # with "full": "uniform" chunks or "block" (first N layers per stage)
    recompute_num_layers: int | None = None  # layers per uniform chunk / recomputed per stage; None: 1
    cross_entropy_chunk_size: int | None = None  # tokens per head + loss chunk; None or 0: all at once
    compile_mlp: bool = False
    # Training-data order (megagrow/data/sampler.py): "single" reads the samples in order, "cyclic" is
    # Megatron's random sampler (a fresh permutation each epoch, within each dp rank's bucket when
    # data_sharding).
    dataloader_type: str = "single"
    data_sharding: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("micro_batch_size", "global_batch_size", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.train_iters is not None and self.train_tokens is not None:
            raise UserError("--train-iters and --train-tokens both given; pass one")
        if self.train_iters is None and self.train_tokens is None:
            raise UserError("give the length of the run with --train-iters or --train-tokens")
        if self.save_interval is not None and self.save is None:
            raise UserError("--save-interval needs --save DIR")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise UserError(f"--exit-interval must be positive, got {self.exit_interval}")
        if self.deepspeed and self.use_distributed_optimizer:
            raise UserError("--use-distributed-optimizer with --deepspeed: ZeRO already shards the optimizer; "
                            "drop --use-distributed-optimizer and choose a --zero-stage")
        if (self.deepspeed_config or self.zero_stage is not None) and not self.deepspeed:
            raise UserError("--deepspeed_config/--zero-stage given without --deepspeed; add --deepspeed")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"--zero-stage {self.zero_stage}: ZeRO stages are 0, 1, 2 and 3")
        if self.weight_decay_incr_style == "constant":
            if self.start_weight_decay is not None or self.end_weight_decay is not None:
                raise UserError("--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear or "
                                "cosine (constant keeps --weight-decay), as in Megatron-LM")
        elif self.start_weight_decay is None or self.end_weight_decay is None:
            raise UserError(f"--weight-decay-incr-style {self.weight_decay_incr_style} needs --start-weight-decay "
                            f"and --end-weight-decay")
        if self.optimizer != "adam":
            raise UserError(f"--optimizer {self.optimizer}: megagrow trains with adam (AdamW, decoupled weight decay) "
                            f"only; drop the flag or pass --optimizer adam")
        if self.dataloader_type == "external":
            raise UserError("--dataloader-type external: megagrow builds its own data loader from --data-path; use "
                            "single or cyclic")
        if self.dataloader_type not in DATALOADER_TYPES:
            raise UserError(f"--dataloader-type {self.dataloader_type}: choose one of {', '.join(DATALOADER_TYPES)}")
        if self.ckpt_format not in CHECKPOINT_FORMATS:
            raise UserError(f"--ckpt-format {self.ckpt_format}: megagrow writes {' or '.join(CHECKPOINT_FORMATS)} "
                            f"checkpoints (torch_dcp and fsdp_dtensor go with FSDP, which megagrow does not have)")
        if not self.distributed_timeout_minutes > 0:
            raise UserError(f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")

    def weight_decay_range(self) -> tuple[float, float]:
        """(start, end) weight decay of the run: --weight-decay at both ends unless an increment style is chosen."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay
        return self.start_weight_decay, self.end_weight_decay


# Orders of a blend's samples (megagrow/data/blended_dataset.py): megatron-core's, or Tijdeman's.
BLEND_RULES = ("megatron", "tijdeman")


@dataclass
class DataConfig:
    """Where the tokens come from: Megatron's --data-path blend, split, tokenizer and index cache."""

    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_model: str | None = None
    data_cache_path: str | None = None
    num_workers: int = 0
    # Synthetic uniform tokens instead of a dataset: for smoke tests and benchmarks only.
    mock_data: bool = False
    # "megatron": megatron-core's blend order (its samples); "tijdeman": every prefix of the
    # stream within one sample of the weights, also with four or more datasets.
    blend_rule: str = "megatron"

    def __post_init__(self):
        if not self.data_path and not self.mock_data:
            raise UserError("no training data: pass --data-path PREFIX (or weight/prefix pairs), or --mock-data")
        if self.blend_rule not in BLEND_RULES:
            raise UserError(f"--blend-rule {self.blend_rule!r}: choose one of {', '.join(BLEND_RULES)}")
