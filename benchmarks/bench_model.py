"""Training-step throughput of megagrow's Llama against HF transformers' LlamaForCausalLM, same process.

    python benchmarks/bench_model.py                         # hidden 256, 4 layers, seq 512, batch 4
    python benchmarks/bench_model.py --profile               # plus the top operators of each
    python benchmarks/bench_model.py --compile               # plus both models under torch.compile
    python benchmarks/bench_model.py --append-to benchmarks/RESULTS.md

Both models get the same architecture and the same weights (megagrow's, converted with
megagrow.checkpoint.hf_llama), fp32, torch SDPA attention, the same AdamW (megagrow's
build_adamw: foreach, decay on matrices only) and the same batches. A step is
forward + cross-entropy loss + backward + optimizer step + zero_grad. Warm-up steps are
not timed; timed steps alternate between the models in rounds so that load from other
processes hits both alike, and each model's time is its median round.

MFU is against a ceiling measured in the same run: the achieved FLOP/s of a large fp32
matmul on the same threads, so it says how close a step comes to what this CPU's GEMM
does, not to a datasheet number. Model FLOPs: megagrow.config.training_flops_per_token.

Amdahl bound: torch.profiler measures which fraction of a few more steps of each model goes
to GEMM and SDPA operators (their own time, not the Python and framework time around them).
That time is the floor of any implementation of this model with these kernels; if
everything else in megagrow's step took no time, its step would be that fraction of its
timed step, so HF's step divided by it is the largest speed-up over HF that removing
overheads can buy on this machine.

--compile adds both models under torch.compile (default inductor settings, the optimizer
left eager) as extra rows, each compiled model against compiled HF; the headline ratio
stays eager against eager.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from megagrow.checkpoint.hf_llama import config_to_hf, to_hf_tensors
from megagrow.checkpoint.reader import group_keys, group_param_names
from megagrow.config import ModelConfig, training_flops_per_token
from megagrow.model.llama import LlamaModel
from megagrow.parallel import state
from megagrow.training.optimizer import OptimizerConfig, build_adamw

GOAL = 1.3


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The benchmarked architecture (vocabulary chosen so megagrow needs no padding rows)."""
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
                       seq_length=args.seq, make_vocab_size_divisible_by=64)


def build_megagrow(config: ModelConfig) -> LlamaModel:
    """megagrow's model at tp=1, pp=1."""
    return LlamaModel(config, seed=1234, force_torch_kernels=True).train()


def build_hf(config: ModelConfig, megagrow: LlamaModel):
    """HF's LlamaForCausalLM with SDPA attention, holding megagrow's weights."""
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config, torch.float32).items()
                                            if k not in ("architectures", "model_type", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config)
    full = megagrow.state_dict()
    weights = {}
    for group in group_keys(config):
        weights.update(to_hf_tensors({name: full[name] for name in group_param_names(group, config)}, config))
    model.load_state_dict(weights, strict=True)
    return model.train()


def megagrow_loss(model: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of megagrow's model on tokens [b, s+1]."""
    return model(tokens[:, :-1], labels=tokens[:, 1:]).mean()


def hf_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of HF's model on tokens [b, s+1]."""
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


class Contender:
    """One model with its optimizer and loss, stepped and timed; `compiled` wraps the model in torch.compile."""

    def __init__(self, name: str, model, loss_fn, compiled: bool = False):
        self.name, self.loss_fn, self.compiled = name, loss_fn, compiled
        self.optimizer = build_adamw(model.parameters(), OptimizerConfig(lr=1e-4, weight_decay=0.1))
        self.model = torch.compile(model) if compiled else model
        self.round_seconds: list[float] = []
        self.first_loss: float | None = None

    def step(self, tokens: torch.Tensor) -> float:
        """One training step; returns the loss."""
        loss = self.loss_fn(self.model, tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def timed_round(self, batches: list[torch.Tensor]) -> None:
        """Run the batches and record the seconds per step."""
        start = time.perf_counter()
        for tokens in batches:
            self.step(tokens)
        self.round_seconds.append((time.perf_counter() - start) / len(batches))

    @property
    def seconds_per_step(self) -> float:
        """Median of the timed rounds."""
        return statistics.median(self.round_seconds)


def matmul_ceiling(size: int, repeats: int) -> float:
    """Achieved FLOP/s of a size x size fp32 matmul (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def kernel_shares(contenders: list[Contender], tokens: torch.Tensor, steps: int) -> list[tuple[float, float]]:
    """Per contender, the fractions of a step spent in GEMM and in SDPA operators (median of `steps` profiled steps)."""
    from torch.profiler import ProfilerActivity, profile

    samples: list[list[tuple[float, float]]] = [[] for _ in contenders]
    for _ in range(steps):  # alternating, like the timed rounds
        for contender, sample in zip(contenders, samples):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                contender.step(tokens)
                seconds = time.perf_counter() - start
            events = prof.key_averages()
            # Self time (microseconds): the kernel itself, not the Python and dispatch above it.
            gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
            sdpa = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::_scaled_dot_product")) / 1e6
            # Fractions of the same step, so that load from other processes, which stretches
            # kernels and the rest alike, cancels out.
            sample.append((gemm / seconds, sdpa / seconds))
    return [(statistics.median(g for g, _ in sample), statistics.median(a for _, a in sample)) for sample in samples]


def profile_table(contender: Contender, tokens: torch.Tensor, rows: int) -> str:
    """torch.profiler's top operators (by self CPU time) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contender.step(tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def render_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Markdown table with right-aligned numeric columns."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def machine_name() -> str:
    """CPU model from lscpu (platform's processor name elsewhere)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for text in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if text.startswith("Model name:"):
                return text.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds; each model's time is its median round")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="print each model's top operators")
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="profiled steps per model for the GEMM/SDPA share and the Amdahl bound")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile (extra rows; compiling takes tens of seconds)")
    parser.add_argument("--append-to", metavar="MD", help="append the result as a section to this markdown file")
    return parser.parse_args(argv)


def build_contenders(config: ModelConfig, compiled: bool) -> list[Contender]:
    """megagrow's model and HF's with the same weights, eager or compiled."""
    suffix = ", torch.compile" if compiled else ""
    megagrow_model = build_megagrow(config)
    return [Contender(f"megagrow LlamaModel{suffix}", megagrow_model, megagrow_loss, compiled),
            Contender(f"HF LlamaForCausalLM (sdpa){suffix}", build_hf(config, megagrow_model), hf_loss, compiled)]


def amdahl_notes(contenders: list[Contender], shares: list[tuple[float, float]]) -> list[str]:
    """Lines on the GEMM/SDPA share of each step and the bound it puts on megagrow's speed-up over HF."""
    parts = [f"{contender.name.split(' ')[0]} GEMM {gemm:.0%} + SDPA {sdpa:.0%} = {gemm + sdpa:.0%} of its step "
             f"({(gemm + sdpa) * contender.seconds_per_step * 1e3:.0f} ms)"
             for contender, (gemm, sdpa) in zip(contenders, shares)]
    floor = sum(shares[0]) * contenders[0].seconds_per_step
    bound = contenders[1].seconds_per_step / floor
    return [f"GEMM/SDPA time (torch.profiler, operators' own time, median of the profiled steps): {'; '.join(parts)}",
            f"Amdahl bound: with everything but its GEMM and SDPA free, megagrow's step would take {floor * 1e3:.0f} ms, "
            f"at most {bound:.2f}x HF; the {GOAL}x goal is {'within' if bound >= GOAL else 'out of'} reach of "
            f"overhead removal on this machine"]


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark, print the table; returns megagrow's speed-up over HF."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]  # other processes' load distorts CPU timings: say how busy it was
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = model_config(args)
    state.initialize(tp=1, pp=1, dp=1)
    try:
        contenders = build_contenders(config, compiled=False)
        if args.compile:
            contenders += build_contenders(config, compiled=True)
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=generator)
                   for _ in range(args.steps_per_round)]
        compile_seconds = 0.0
        with warnings.catch_warnings():
            # Dynamo's notes on what it traces through say nothing about speed.
            warnings.simplefilter("ignore", UserWarning)
            for contender in contenders:  # same weights, same batch: the losses must agree
                start = time.perf_counter()
                contender.first_loss = contender.step(batches[0])
                for _ in range(args.warmup - 1):
                    contender.step(batches[0])
                compile_seconds += time.perf_counter() - start if contender.compiled else 0.0
        ceiling = matmul_ceiling(args.matmul_size, 5)
        for _ in range(args.rounds):
            for contender in contenders:
                contender.timed_round(batches)
        ceiling = max(ceiling, matmul_ceiling(args.matmul_size, 5))
        shares = kernel_shares(contenders[:2], batches[0], args.profile_steps)
        profiles = [profile_table(c, batches[0], 15) for c in contenders] if args.profile else []
    finally:
        state.destroy()

    tokens_per_step = args.batch * args.seq
    flops_per_token = training_flops_per_token(config, args.seq)
    rows = []
    for index, contender in enumerate(contenders):
        reference = contenders[index | 1].seconds_per_step  # HF in the same mode: eager or compiled
        seconds = contender.seconds_per_step
        tokens_per_second = tokens_per_step / seconds
        rows.append((contender.name, f"{seconds * 1e3:.0f}", f"{tokens_per_second:,.0f}",
                     f"{tokens_per_second * flops_per_token / ceiling:.1%}", f"{reference / seconds:.2f}x"))
    table = render_table(("implementation", "ms/step", "tokens/s", "MFU vs matmul", "speed-up vs HF"), rows)
    speedup = contenders[1].seconds_per_step / contenders[0].seconds_per_step
    losses = ", ".join(f"{c.first_loss:.6f} ({c.name})" for c in contenders)
    notes = [
        f"model: hidden {config.hidden_size}, {config.num_layers} layers, {config.num_attention_heads} heads / "
        f"{config.query_groups} kv heads, ffn {config.ffn_hidden_size}, vocab {config.vocab_size}; "
        f"seq {args.seq}, batch {args.batch}; fp32; {args.threads} threads; {flops_per_token / 1e6:.1f} MFLOP/token",
        f"matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s ({args.matmul_size}^3 fp32 mm); first-step losses {losses}",
        f"timing: {args.warmup} warm-up steps each, then median of {args.rounds} alternating rounds of "
        f"{args.steps_per_round} steps; 1-min load average {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after (this run's own threads included); "
        f"goal {GOAL}x: {'met' if speedup >= GOAL else 'not met'}",
        *amdahl_notes(contenders, shares),
    ]
    if args.compile:
        notes.append(f"torch.compile rows: speed-up against compiled HF; the compiled models' warm-up steps took "
                     f"{compile_seconds:.0f} s in all (compilation)")
    print(table)
    print("\n".join(notes))
    for contender, text in zip(contenders, profiles):
        print(f"\n### {contender.name}: top operators of one step\n{text}")
    if args.append_to:
        import transformers

        flags = sys.argv[1:] if argv is None else argv
        command = " ".join(["python benchmarks/bench_model.py", *flags])
        section = [f"\n## bench_model: megagrow vs HF Llama training step ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})",
                   "", f"- machine: {os.cpu_count()}-core CPU, {machine_name()} ({platform.machine()}); "
                   f"torch threads {torch.get_num_threads()}",
                   f"- torch {torch.__version__}, transformers {transformers.__version__}",
                   f"- command: `{command}`", *[f"- {note}" for note in notes], "", table, ""]
        path = Path(args.append_to)
        if not path.exists():
            path.write_text("# Benchmark results\n\nOne section per run; each compares against a reference measured "
                            "in the same run.\n")
        with open(path, "a") as f:
            f.write("\n".join(section))
    return speedup


if __name__ == "__main__":
    main()
