"""Megatron-LM and Megatron-DeepSpeed launch-script flags that megagrow has no setting of its own for.

Stock launch scripts (Megatron-LM's examples/, Megatron-DeepSpeed's examples_deepspeed/)
pass many flags that switch kernels, logging or features. Each one is one of:

    followed  it asks for what megagrow does anyway: accepted; its --help line says how
    checked   accepted for the values megagrow honours (--context-parallel-size 1), refused
              with one line for the others
    refused   a feature megagrow does not have: one line says why and what to do instead

Flags that megagrow implements (--optimizer, --dataloader-type, --recompute-method,
--num-key-value-heads, ...) are ordinary flags of megagrow/arguments.py; the sample-based
schedule flags are converted to iterations here. Anything else unknown is refused by the
parser with one line naming it.
"""

from __future__ import annotations

import argparse

from megagrow.errors import UserError

_FUSION = "megagrow chooses its kernels itself (logged at start-up); no kernel changes the result"

# flag(s) -> what megagrow does, shown by --help.
FOLLOWED: dict[tuple[str, ...], str] = {
    ("--use-mcore-models",): "megagrow's model has megatron-core's structure and checkpoint names already",
    ("--no-query-key-layer-scaling",): "megagrow scales attention scores by 1/sqrt(head dim) only, as this asks",
    ("--no-gradient-accumulation-fusion",): "megagrow adds weight gradients into fp32 main_grad without a fused kernel",
    ("--no-async-tensor-model-parallel-allreduce",): "megagrow's tensor-parallel all-reduces are synchronous",
    ("--log-throughput",): "megagrow always logs tokens/s, TFLOP/s per device and MFU",
    ("--log-validation-ppl-to-tensorboard",): "megagrow always writes the validation perplexity",
    ("--log-memory-to-tensorboard",): "megagrow always writes peak memory (memory_gb) with the training metrics",
    ("--overlap-param-gather",): "with --use-distributed-optimizer megagrow all-gathers the updated weights right "
                                 "after the step, not overlapped with the next forward: same weights, less overlap",
    ("--use-contiguous-parameters-in-local-ddp",): "megagrow's gradient buffers are contiguous per bucket already",
    ("--no-create-attention-mask-in-dataloader",): "megagrow never builds masks in the data loader (causal kernels)",
    ("--no-mmap-bin-files",): "megagrow memory-maps .bin files; the tokens read are the same",
    ("--cross-entropy-loss-fusion",): "megagrow's vocab-parallel cross entropy is one function; same loss",
    ("--calculate-per-token-loss",): "every token of a pre-training batch counts (no loss mask), so the per-token "
                                     "mean equals megagrow's mean of equal-sized micro-batches",
    ("--attention-softmax-in-fp32",): "on GPUs megagrow's attention kernels (flash-attn, SDPA's fused ones) keep the "
                                      "softmax in fp32",
    ("--use-flash-attn-v1", "--use-flash-attn-v2", "--use-flash-attn-triton"):
        "megagrow uses flash-attn when it is installed and on CUDA, else torch SDPA (logged at start-up)",
    ("--no-rope-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion",
     "--no-persist-layer-norm"): _FUSION,
    ("--override-opt_param-scheduler", "--override-opt-param-scheduler"):
        "on --load megagrow's current schedule flags always win over the checkpoint's",
    ("--deepspeed-activation-checkpointing",): "recomputation is what --recompute-granularity/--checkpoint-activations "
                                               "ask, done with torch.utils.checkpoint (no activation partitioning)",
    ("--no-pipeline-parallel",): "megagrow never uses DeepSpeed's PipelineEngine (its own 1F1B schedule runs the "
                                 "pipeline); needs --pipeline-model-parallel-size 1, as in Megatron-DeepSpeed",
}

# flag -> (value type, the values accepted (empty: any), help saying which and why)
CHECKED: dict[str, tuple[type, tuple, str]] = {
    "--context-parallel-size": (int, (1,), "1 only: megagrow has no context parallelism"),
    "--rotary-percent": (float, (1.0,), "1.0 only: Llama rotates every channel of a head"),
    "--data-impl": (str, ("mmap", "infer"), "mmap (or infer): megagrow reads Megatron's mmap indexed datasets"),
    "--empty-unused-memory-level": (int, (0,), "0 only: megagrow never empties the CUDA cache while training"),
    "--transformer-impl": (str, ("local",), "local only: megagrow builds its own layers, no Transformer Engine"),
    "--attention-backend": (str, ("auto", "flash", "fused", "unfused", "local"),
                            "any of Megatron's: megagrow picks flash-attn on CUDA when installed, else torch SDPA "
                            "(the same function)"),
    # Checked in arguments.py, once the model (perhaps a preset) is known.
    "--kv-channels": (int, (), "must equal --hidden-size / --num-attention-heads (Llama's head dimension)"),
    "--tiktoken-pattern": (str, (), "read only by TikTokenizer, which megagrow does not have; ignored by the others "
                                    "as in Megatron"),
}

_NO_FP8 = "megagrow trains in fp32/bf16/fp16, not fp8 (no Transformer Engine); drop the fp8 flags"
_NO_FSDP = "megagrow shards with --use-distributed-optimizer or DeepSpeed ZeRO (--deepspeed --zero-stage 3), not FSDP"
_NO_WANDB = "megagrow logs to metrics.jsonl and TensorBoard (--tensorboard-dir), not Weights & Biases; drop it"
_NO_PROFILER = "megagrow has no built-in profiler; run it under nsys or torch.profiler instead"
_NOT_LOGGED = "megagrow does not log this; its metrics are loss, lr, grad norm, throughput, MFU, memory, perplexity"

# flag -> why megagrow refuses it (one line, with what to do instead).
REFUSED: dict[str, str] = {
    **{flag: _NO_FP8 for flag in ("--fp8", "--fp8-format", "--fp8-recipe", "--fp8-margin", "--fp8-interval",
                                  "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather",
                                  "--keep_fp8_weight_transpose_cache")},
    **{flag: _NO_FSDP for flag in ("--use-torch-fsdp2", "--use-megatron-fsdp", "--data-parallel-sharding-strategy",
                                   "--fsdp-double-buffer")},
    **{flag: _NO_WANDB for flag in ("--wandb-project", "--wandb-exp-name", "--wandb-save-dir", "--wandb-entity")},
    **{flag: _NO_PROFILER for flag in ("--profile", "--use-pytorch-profiler", "--profile-step-start",
                                       "--profile-step-end", "--profile-ranks")},
    **{flag: _NOT_LOGGED for flag in ("--log-params-norm", "--log-num-zeros-in-grad", "--log-timers-to-tensorboard",
                                      "--log-batch-size-to-tensorboard", "--log-world-size-to-tensorboard",
                                      "--log-optimizer-states-to-tensorboard", "--timing-log-level")},
    "--use-legacy-models": "megagrow builds megatron-core (mcore) style models only",
    "--apply-layernorm-1p": "megagrow's RMSNorm keeps the scale itself, not a zero-centred (1 + w) one; drop it",
    "--apply-query-key-layer-scaling": "megagrow does not rescale attention scores by layer number; drop it",
    "--decoupled-lr": "megagrow has one learning rate for all parameters; drop --decoupled-lr/--decoupled-min-lr",
    "--decoupled-min-lr": "megagrow has one learning rate for all parameters; drop --decoupled-lr/--decoupled-min-lr",
    "--grad-reduce-in-bf16": "megagrow reduces gradients in fp32 (its main_grad buffers); drop it",
    "--manual-gc": "megagrow leaves Python's garbage collector automatic; drop --manual-gc",
    "--manual-gc-interval": "megagrow leaves Python's garbage collector automatic; drop --manual-gc",
    "--exit-duration-in-mins": "megagrow stops by --exit-interval or on SIGTERM (it saves, then exits); use those",
    "--rampup-batch-size": "megagrow keeps the global batch fixed; drop the batch-size ramp-up",
    "--step-batch-size-schedule": "megagrow keeps the global batch fixed; drop the batch-size schedule",
    "--vocab-file": "GPT-2 vocab/merges files: save them as a tokenizer.json and use --tokenizer-type "
                    "HuggingFaceTokenizer --tokenizer-model DIR",
    "--merge-file": "GPT-2 vocab/merges files: save them as a tokenizer.json and use --tokenizer-type "
                    "HuggingFaceTokenizer --tokenizer-model DIR",
    "--ds-sequence-parallel-size": "megagrow has no DeepSpeed-Ulysses sequence parallelism; use --sequence-parallel "
                                   "with tensor parallelism",
    "--repeated-dataloader": "use --dataloader-type cyclic to go through the data again",
    "--universal-checkpoint": "megagrow reshards with tools/convert_checkpoint.py, not DeepSpeed universal checkpoints",
    "--finetune": "megagrow resumes pre-training with --load (add --no-load-optim --no-load-rng for fresh state)",
    "--use-checkpoint-opt_param-scheduler": "megagrow's schedule always comes from the current flags; drop it",
    "--use-flash-attn-builder": "megagrow uses the flash-attn package when installed; drop it",
}


def _store_true(group, flags: tuple[str, ...], help_text: str) -> None:
    group.add_argument(*flags, dest=flags[0].lstrip("-").replace("-", "_"), action="store_true", help=help_text)


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """Register the followed, checked and refused Megatron flags on pretrain_gpt.py's parser."""
    group = parser.add_argument_group("Megatron flags megagrow follows anyway (accepted)")
    for flags, help_text in FOLLOWED.items():
        _store_true(group, flags, help_text)
    group = parser.add_argument_group("Megatron flags accepted for some values")
    for flag, (kind, _, help_text) in CHECKED.items():
        group.add_argument(flag, type=kind, help=help_text)
    group = parser.add_argument_group("Megatron flags megagrow refuses (the reason is the help)")
    for flag, reason in REFUSED.items():
        # Any value (or none) parses, so the refusal, not argparse, says what is wrong.
        group.add_argument(flag, dest=f"refused_{flag.lstrip('-').replace('-', '_')}", nargs="*", help=reason)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_megatron_flags(values: dict) -> None:
    """Refuse, with one line naming the flag, the refused flags and the values megagrow cannot honour."""
    for flag, reason in REFUSED.items():
        if f"refused_{_dest(flag)}" in values:
            raise UserError(f"{flag}: {reason}")
    for flag, (_, accepted, reason) in CHECKED.items():
        value = values.get(_dest(flag))
        if value is not None and accepted and value not in accepted:
            raise UserError(f"{flag} {value}: accepted {reason}")
    if values.get("no_pipeline_parallel") and values.get("pipeline_model_parallel_size", 1) > 1:
        raise UserError(f"--no-pipeline-parallel with --pipeline-model-parallel-size "
                        f"{values['pipeline_model_parallel_size']}: Megatron-DeepSpeed requires size 1 with it; "
                        f"drop one of them")


def _exact_iterations(samples: int, global_batch_size: int, flag: str) -> int:
    iterations, rest = divmod(samples, global_batch_size)
    if rest:
        raise UserError(f"{flag} {samples} is not a whole number of --global-batch-size {global_batch_size} batches; "
                        f"megagrow counts iterations: give {flag.replace('samples', 'iters')} instead")
    return iterations


def samples_to_iterations(values: dict) -> dict:
    """Megatron's sample-based run length and LR schedule (--train-samples, --lr-*-samples) as the
    iteration flags they equal with a fixed global batch (--lr-warmup-fraction stays a fraction)."""
    values = dict(values)
    batch = values.get("global_batch_size", 8)
    if "train_samples" in values:
        if "train_iters" in values or "train_tokens" in values:
            raise UserError("--train-samples with --train-iters/--train-tokens: give one length of the run")
        values["train_iters"] = _exact_iterations(values.pop("train_samples"), batch, "--train-samples")
    for name in ("lr_decay", "lr_warmup", "lr_wsd_decay"):
        flag = f"--{name.replace('_', '-')}"
        samples = values.pop(f"{name}_samples", None)
        if samples is not None:
            if f"{name}_iters" in values:
                raise UserError(f"{flag}-samples with {flag}-iters; give one")
            values[f"{name}_iters"] = _exact_iterations(samples, batch, f"{flag}-samples")
    if values.get("lr_warmup_fraction") is not None and "lr_warmup_iters" in values:
        raise UserError("--lr-warmup-fraction with --lr-warmup-iters/--lr-warmup-samples; give one")
    return values
