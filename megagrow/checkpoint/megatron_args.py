"""Megatron-LM's `args` record: written from megagrow's configs, and read back into a ModelConfig.

Megatron-LM stores its whole argparse Namespace in every checkpoint (`args` in the torch
format, in common.pt for torch_dist) and reads model settings back from it
(`--use-checkpoint-args`, `check_checkpoint_args`) and the data position from
`consumed_train_samples`. megagrow writes the same attribute names, so Megatron-LM resumes
from a megagrow checkpoint, and reads them to know the model a Megatron checkpoint holds.

Only what megagrow's Llama can represent exactly is read: RMSNorm, SwiGLU, RoPE (not
interleaved, no scaling, on every channel), no biases, no MoE, head size hidden/heads. Any
other architecture is refused in one line naming the setting, never converted approximately.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

import torch

from megagrow.config import ModelConfig, ParallelConfig, TrainConfig, padded_vocab_size
from megagrow.errors import UserError

MEGATRON_CHECKPOINT_VERSION = 3.0
_DTYPE_FLAGS = {"float32": (False, False), "bfloat16": (True, False), "float16": (False, True)}
_PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_args(config: ModelConfig, tp: int) -> dict[str, Any]:
    """Megatron-LM's model attributes for `config` saved with tensor-parallel size `tp`."""
    bf16, fp16 = _DTYPE_FLAGS[config.params_dtype]
    return {
        "num_layers": config.num_layers, "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size, "num_attention_heads": config.num_attention_heads,
        "group_query_attention": config.query_groups != config.num_attention_heads,
        "num_query_groups": config.query_groups, "kv_channels": config.head_dim,
        "seq_length": config.seq_length, "max_position_embeddings": config.max_positions,
        "position_embedding_type": "rope", "add_position_embedding": False,
        "use_rotary_position_embeddings": True, "rotary_base": config.rope_theta, "rotary_percent": 1.0,
        "rotary_interleaved": False, "use_rope_scaling": False, "add_bias_linear": False, "add_qkv_bias": False,
        "swiglu": True, "squared_relu": False, "normalization": "RMSNorm", "norm_epsilon": config.norm_eps,
        "apply_layernorm_1p": False, "qk_layernorm": False, "apply_query_key_layer_scaling": False,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "num_experts": None,
        "untie_embeddings_and_output_weights": not config.tie_embeddings,
        "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by, "vocab_size": config.vocab_size,
        "padded_vocab_size": padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp),
        "init_method_std": config.init_method_std, "params_dtype": _PARAMS_DTYPES[config.params_dtype],
        "bf16": bf16, "fp16": fp16, "transformer_impl": "local",
    }


def build_args(config: ModelConfig, parallel: ParallelConfig, *, ckpt_format: str, train: TrainConfig | None = None,
               consumed_train_samples: int = 0, consumed_valid_samples: int = 0, tokenizer: dict | None = None
               ) -> argparse.Namespace:
    """The `args` Namespace of a megagrow checkpoint, as Megatron-LM would have saved it for the same run."""
    values = model_args(config, parallel.tp)
    values.update({
        "tensor_model_parallel_size": parallel.tp, "pipeline_model_parallel_size": parallel.pp,
        "data_parallel_size": parallel.dp, "world_size": parallel.world_size, "context_parallel_size": 1,
        "expert_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
        "sequence_parallel": parallel.sequence_parallel and parallel.tp > 1, "ckpt_format": ckpt_format,
        "consumed_train_samples": consumed_train_samples, "consumed_valid_samples": consumed_valid_samples,
        "skipped_train_samples": 0, "data_parallel_random_init": False,
    })
    if train is not None:
        values.update({
            "micro_batch_size": train.micro_batch_size, "global_batch_size": train.global_batch_size,
            "train_iters": train.train_iters, "lr": train.lr, "min_lr": train.min_lr,
            "lr_warmup_iters": train.lr_warmup_iters, "lr_warmup_fraction": train.lr_warmup_fraction,
            "lr_warmup_init": train.lr_warmup_init, "lr_decay_iters": train.lr_decay_iters or train.train_iters,
            "lr_decay_style": train.lr_decay_style, "lr_wsd_decay_iters": train.lr_wsd_decay_iters,
            "lr_wsd_decay_style": train.lr_wsd_decay_style, "weight_decay": train.weight_decay,
            "start_weight_decay": train.weight_decay_range()[0], "end_weight_decay": train.weight_decay_range()[1],
            "weight_decay_incr_style": train.weight_decay_incr_style, "clip_grad": train.clip_grad,
            "adam_beta1": train.adam_beta1, "adam_beta2": train.adam_beta2, "adam_eps": train.adam_eps,
            "optimizer": "adam", "seed": train.seed, "use_distributed_optimizer": train.use_distributed_optimizer,
            "bf16": train.precision == "bf16", "fp16": train.precision == "fp16",
            "save_interval": train.save_interval, "eval_interval": train.eval_interval, "eval_iters": train.eval_iters,
        })
    values.update(tokenizer or {})
    return argparse.Namespace(**values)


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _refuse(where: str, what: str) -> UserError:
    return UserError(f"{where}: the checkpoint's model has {what}, which megagrow's Llama cannot represent; "
                     f"only RMSNorm/SwiGLU/RoPE models without biases or experts convert")


def check_llama_args(args: argparse.Namespace, where: str) -> None:
    """Refuse, in one line, a Megatron model that megagrow's Llama cannot represent exactly."""
    if _get(args, "add_bias_linear", not _get(args, "disable_bias_linear", False)) or _get(args, "add_qkv_bias"):
        raise _refuse(where, "biases (add_bias_linear/add_qkv_bias)")
    normalization = str(_get(args, "normalization", "LayerNorm"))
    if normalization.lower() != "rmsnorm":
        raise _refuse(where, f"normalization {normalization}")
    if not _get(args, "swiglu", False) or _get(args, "squared_relu", False):
        raise _refuse(where, "a non-SwiGLU MLP (swiglu is off)")
    if _get(args, "num_experts") or _get(args, "moe_layer_freq", 1) not in (1, None):
        raise _refuse(where, f"mixture of experts (num_experts {_get(args, 'num_experts')})")
    position = _get(args, "position_embedding_type", "learned_absolute")
    if position != "rope":
        raise _refuse(where, f"position_embedding_type {position}")
    if _get(args, "use_rope_scaling", False):
        raise _refuse(where, "scaled RoPE (use_rope_scaling)")
    if _get(args, "rotary_percent", 1.0) != 1.0:
        raise _refuse(where, f"rotary_percent {_get(args, 'rotary_percent')}")
    if _get(args, "rotary_interleaved", False):
        raise _refuse(where, "interleaved RoPE (rotary_interleaved)")
    for flag in ("apply_layernorm_1p", "qk_layernorm", "multi_latent_attention"):
        if _get(args, flag, False):
            raise _refuse(where, flag)
    heads, hidden = _get(args, "num_attention_heads"), _get(args, "hidden_size")
    kv_channels = _get(args, "kv_channels")
    if heads and hidden and kv_channels and kv_channels * heads != hidden:
        raise _refuse(where, f"kv_channels {kv_channels} != hidden_size / num_attention_heads")
    if _get(args, "virtual_pipeline_model_parallel_size"):
        raise UserError(f"{where}: saved with a virtual (interleaved) pipeline; reshard it with Megatron-LM to "
                        f"pipeline stages without --num-layers-per-virtual-pipeline-stage first")


def model_config_from_args(args: argparse.Namespace, where: str, *, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a Megatron `args` record (refusing what megagrow cannot represent).

    The vocabulary is the record's `vocab_size`, else `vocab_size` when given (e.g. the
    tokenizer's), else the padded size: Megatron computes its loss over every padded row, so
    a model read without knowing its tokenizer keeps them all.
    """
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{where}: the checkpoint's args is a {type(args).__name__}, not Megatron-LM's Namespace")
    check_llama_args(args, where)
    required = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
    missing = [name for name in required if _get(args, name) is None]
    if missing:
        raise UserError(f"{where}: the checkpoint's args lack {', '.join(missing)}; it does not describe a GPT model")
    dtype = "bfloat16" if _get(args, "bf16", False) else "float16" if _get(args, "fp16", False) else "float32"
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else None
    padded = _get(args, "padded_vocab_size")
    vocab = _get(args, "vocab_size") or vocab_size or padded
    if vocab is None:
        raise UserError(f"{where}: the checkpoint's args give no vocab_size or padded_vocab_size; pass --vocab-size")
    hidden = int(args.hidden_size)
    positions = _get(args, "max_position_embeddings")
    if positions is not None and int(positions) == int(args.seq_length):
        positions = None  # megagrow's way of saying "as long as the sequence"
    return ModelConfig(
        num_layers=int(args.num_layers), hidden_size=hidden,
        ffn_hidden_size=int(_get(args, "ffn_hidden_size", 4 * hidden)),
        num_attention_heads=int(args.num_attention_heads), vocab_size=int(vocab), seq_length=int(args.seq_length),
        num_query_groups=int(groups) if groups else None,
        max_position_embeddings=None if positions is None else int(positions),
        rope_theta=float(_get(args, "rotary_base", 10000)), norm_eps=float(_get(args, "norm_epsilon", 1e-5)),
        tie_embeddings=not _get(args, "untie_embeddings_and_output_weights", False),
        make_vocab_size_divisible_by=int(_get(args, "make_vocab_size_divisible_by", 128)),
        init_method_std=float(_get(args, "init_method_std", 0.02)), params_dtype=dtype)


def parallel_sizes_from_args(args: argparse.Namespace) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes recorded in Megatron `args` (1, 1 where absent)."""
    return int(_get(args, "tensor_model_parallel_size", 1)), int(_get(args, "pipeline_model_parallel_size", 1))


def config_record(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig | None) -> dict:
    """megagrow's own configs as plain dicts (kept beside `args`, which cannot hold all of them)."""
    record = {"model": asdict(model), "parallel": asdict(parallel)}
    if train is not None:
        record["train"] = asdict(train)
    return record
