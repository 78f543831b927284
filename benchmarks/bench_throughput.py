"""Single-device training throughput with every fast path on, then with each one switched off.

    python benchmarks/bench_throughput.py --model-preset tinyllama-1.1b            # one GPU, bf16, seq 2048
    python benchmarks/bench_throughput.py --model-preset tiny --device cpu --iters 3  # smoke test

A step is megagrow's real training iteration (Trainer.train_step on --mock-data: forward,
loss, backward, fp32 main grads, clipped AdamW on fp32 master weights), built from the same
flags pretrain_gpt.py takes. Each configuration searches its own best micro-batch (1, 2, 4,
... on CUDA until it runs out of memory), since what some fast paths buy is memory: the
chunked cross entropy, for one, lets a larger micro-batch fit. Ratios are against the
all-on run of the same invocation.

Fast paths: flash-attn 2, apex fused RMSNorm, fused AdamW (apex, else torch's fused), the
chunked head + cross entropy, and torch.compile of the SwiGLU gate (CUDA only by default;
--compile-on-cpu adds it on CPU, where inductor's first compile takes tens of seconds).
Kernels that cannot load here fall back in both runs, so their row reads ~1.00x.
TFLOP/s use megagrow.config.training_flops_per_token; MFU is against the device's bf16 peak
(megagrow.training.metrics), reported only for known devices or with --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench_model import render_table
from megagrow.arguments import parse_args as parse_training_flags
from megagrow.config import model_preset, training_flops_per_token
from megagrow.errors import UserError, exit_on_user_error
from megagrow.model import backends
from megagrow.model.swiglu import COMPILED, EAGER, swiglu, swiglu_implementation
from megagrow.parallel import state
from megagrow.training.metrics import measure_throughput, peak_tflops
from megagrow.training.optimizer import select_adamw_backend
from megagrow.training.trainer import Trainer


@dataclass(frozen=True)
class Setup:
    """One configuration: which fused kernels are disabled and which speed flags are given."""

    name: str
    disabled_kernels: tuple[str, ...] = ()  # kinds for MEGAGROW_DISABLE_FUSED
    chunked_loss: bool = True
    compile_mlp: bool = True


@dataclass
class Measurement:
    """The best micro-batch of one setup and what it achieved."""

    setup: Setup
    micro_batch_size: int | None = None
    seconds_per_step: float | None = None
    kernels: dict[str, str] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)  # "4: OOM" and the like, for the notes


def setups(compile_mlp: bool) -> list[Setup]:
    """All on, each fast path off on its own, all off."""
    on = Setup("all on", compile_mlp=compile_mlp)
    rows = [on,
            Setup("flash-attn off", ("attention",), compile_mlp=compile_mlp),
            Setup("fused RMSNorm off", ("rmsnorm",), compile_mlp=compile_mlp),
            Setup("fused AdamW off", ("adamw",), compile_mlp=compile_mlp),
            Setup("chunked cross entropy off", chunked_loss=False, compile_mlp=compile_mlp)]
    if compile_mlp:
        rows.append(Setup("torch.compile SwiGLU off", compile_mlp=False))
    rows.append(Setup("all off", ("attention", "rmsnorm", "adamw"), chunked_loss=False, compile_mlp=False))
    return rows


@contextlib.contextmanager
def disabled_kernels(kinds: tuple[str, ...]):
    """Set MEGAGROW_DISABLE_FUSED for the duration, with the cached kernel choices forgotten on both sides."""
    previous = os.environ.get(backends.DISABLE_FUSED_ENV)
    os.environ[backends.DISABLE_FUSED_ENV] = ",".join(kinds)
    backends.reset_backend_choices()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(backends.DISABLE_FUSED_ENV)
        else:
            os.environ[backends.DISABLE_FUSED_ENV] = previous
        backends.reset_backend_choices()


def training_flags(args: argparse.Namespace, setup: Setup, micro_batch_size: int, metrics_file: str) -> list[str]:
    """pretrain_gpt.py flags for one timed run of `setup`."""
    flags = ["--model-preset", args.model_preset, "--seq-length", str(args.seq_length), "--mock-data",
             "--micro-batch-size", str(micro_batch_size), "--global-batch-size", str(micro_batch_size),
             "--train-iters", str(args.warmup + args.iters), "--eval-interval", "0", "--log-interval", "1000000",
             "--metrics-file", metrics_file]
    if args.precision != "fp32":
        flags.append(f"--{args.precision}")
    if setup.chunked_loss:
        flags += ["--cross-entropy-chunk-size", str(args.cross_entropy_chunk_size)]
    if setup.compile_mlp:
        flags.append("--compile-mlp")
    if args.recompute_granularity:
        flags += ["--recompute-granularity", args.recompute_granularity]
    return flags


def kernels_in_use(trainer: Trainer, device: torch.device, setup: Setup) -> dict[str, str]:
    """Which implementation of each fast path this run used (after its fallbacks)."""
    dtype = trainer.model_config.torch_dtype
    gate = swiglu_implementation(setup.compile_mlp)
    return {"attention": backends.attention_backend(device, dtype), "norm": backends.norm_backend(device),
            "AdamW": select_adamw_backend(list(trainer.model.parameters())),
            "CE": "chunked" if setup.chunked_loss else "whole", "SwiGLU": EAGER if gate is swiglu else COMPILED}


def time_steps(args: argparse.Namespace, setup: Setup, micro_batch_size: int, device: torch.device,
               metrics_dir: str) -> tuple[float, dict[str, str]]:
    """Median seconds per training step of `setup` at this micro-batch, and the kernels it used."""
    config = parse_training_flags(training_flags(args, setup, micro_batch_size, os.path.join(metrics_dir, "m.jsonl")))
    state.initialize(tp=1, pp=1, dp=1)
    trainer = None
    try:
        trainer = Trainer(config.model, config.parallel, config.train, config.data)
        for _ in range(args.warmup):  # first steps allocate optimizer state and compile
            trainer.train_step()
        seconds = []
        for _ in range(args.iters):
            start = time.perf_counter()
            trainer.train_step()  # returns the loss as a float: the step has finished on the device
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), kernels_in_use(trainer, device, setup)
    finally:
        if trainer is not None and trainer.metrics is not None:
            trainer.metrics.close()
        del trainer
        state.destroy()


def release_memory(device: torch.device) -> None:
    """Return what a finished (or out-of-memory) run held, so the next one starts from the same free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(args: argparse.Namespace, setup: Setup, device: torch.device) -> Measurement:
    """Best throughput of `setup` over the candidate micro-batch sizes (stopping at the first that does not fit)."""
    result = Measurement(setup)
    with disabled_kernels(setup.disabled_kernels), tempfile.TemporaryDirectory() as metrics_dir:
        for micro_batch_size in args.micro_batch_sizes:
            out_of_memory = False
            try:
                seconds, kernels = time_steps(args, setup, micro_batch_size, device, metrics_dir)
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True  # handled outside the except block, whose traceback pins the tensors
            release_memory(device)
            if out_of_memory:
                result.tried.append(f"{micro_batch_size}: OOM")
                break
            result.tried.append(f"{micro_batch_size}: {seconds * 1e3:.0f} ms")
            per_token = seconds / micro_batch_size
            if result.seconds_per_step is None or per_token < result.seconds_per_step / result.micro_batch_size:
                result.micro_batch_size, result.seconds_per_step, result.kernels = micro_batch_size, seconds, kernels
    return result


def report(args: argparse.Namespace, results: list[Measurement], device_name: str) -> str:
    """The comparison table (ratios against the first, all-on, row) and notes on how it was measured."""
    flops_per_token = training_flops_per_token(model_preset(args.model_preset), args.seq_length)
    peak = peak_tflops(device_name, args.peak_tflops)
    reference = None
    rows = []
    for result in results:
        if result.micro_batch_size is None:
            rows.append((result.setup.name, "-", "-", "-", "-", "-", "did not fit", "-", "-", "-", "-"))
            continue
        speed = measure_throughput(result.micro_batch_size * args.seq_length, result.seconds_per_step,
                                   flops_per_token, 1, peak)
        reference = reference or speed.tokens_per_second
        k = result.kernels
        rows.append((result.setup.name, k["attention"], k["norm"], k["AdamW"], k["CE"], k["SwiGLU"],
                     str(result.micro_batch_size), f"{speed.tokens_per_second:,.0f}", f"{speed.tflops_per_device:.3g}",
                     "n/a" if speed.mfu is None else f"{speed.mfu:.1%}", f"{speed.tokens_per_second / reference:.2f}x"))
    table = render_table(("setup", "attention", "norm", "AdamW", "CE", "SwiGLU", "micro-batch", "tokens/s",
                          "TFLOP/s", "MFU", "vs all on"), rows)
    notes = [f"device: {device_name}; torch {torch.__version__}; {args.model_preset} at seq {args.seq_length}, "
             f"{args.precision}; {flops_per_token / 1e9:.2f} GFLOP/token; peak {peak or 'unknown'} TFLOP/s",
             f"timing: median of {args.iters} steps after {args.warmup} warm-up steps; "
             f"cross-entropy chunks of {args.cross_entropy_chunk_size} tokens; "
             f"recompute {args.recompute_granularity or 'off'}",
             *[f"{r.setup.name}: micro-batches tried {', '.join(r.tried)}" for r in results]]
    return table + "\n" + "\n".join(notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (defaults depend on the device)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-preset", default="tinyllama-1.1b")
    parser.add_argument("--seq-length", type=int, help="default: the preset's")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per micro-batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+",
                        help="candidates in increasing order (default: 1 2 4 ... 64 on CUDA, 1 on CPU)")
    parser.add_argument("--cross-entropy-chunk-size", type=int, default=4096)
    parser.add_argument("--recompute-granularity", choices=["full", "selective"], help="applied to every setup")
    parser.add_argument("--compile-on-cpu", action="store_true", help="include torch.compile on CPU")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from the device table)")
    args = parser.parse_args(argv)
    args.seq_length = args.seq_length or model_preset(args.model_preset).seq_length
    if args.micro_batch_sizes is None:
        args.micro_batch_sizes = [2**i for i in range(7)] if args.device == "cuda" else [1]
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Measurement]:
    """Measure every setup and print the table."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU; pass --device cpu")
    if args.device == "cpu" and torch.cuda.is_available():
        # The Trainer, like pretrain_gpt.py, trains on the GPU whenever torch sees one.
        raise UserError("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= to hide it")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = [measure(args, setup, device) for setup in setups(compile_mlp=args.device == "cuda" or args.compile_on_cpu)]
    print(report(args, results, device_name))
    return results


if __name__ == "__main__":
    main()
