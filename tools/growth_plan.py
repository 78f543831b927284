"""Plan a G_stack run: how long to train the base model, how far to grow it, and the tokens after growth.

    python tools/growth_plan.py --target-params 7B --tokens 2T
    python tools/growth_plan.py --model-preset llama2-7b --compute 8.4e22
    python tools/growth_plan.py --model-preset tinyllama-1.1b --tokens 300B --growth-factor 2

Applies the growth-timing guideline of arXiv 2405.15319,
log10(d) = a * log10(N) + b / log10(C) + c, with N the target's parameters and C = 6 * N * D
the run's compute, and the paper's growth factor g = 4 (or, when the target's depth is not
divisible by 4, the nearest factor that divides it). Prints the base model (same width, 1/g
of the layers), the tokens it trains on before growth, and the tokens left for the grown
model. Sources and accounting: megagrow/growth/guidelines.py.
"""

from __future__ import annotations

import argparse
import re

from megagrow.config import MODEL_PRESETS, model_preset, num_parameters
from megagrow.errors import UserError, exit_on_user_error
from megagrow.growth.guidelines import (
    PAPER_GROWTH_FACTOR,
    SMALLEST_STUDIED_TARGET,
    GrowthPlan,
    GrowthTimingLaw,
    format_count,
    plan_growth,
    training_compute,
)

_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


def parse_count(flag: str, text: str) -> float:
    """A positive count such as 7e9, 7B, 300B or 2T (K, M, B or G, T suffixes)."""
    match = _COUNT.match(text)
    if not match:
        raise UserError(f"{flag} {text!r} is not a number (examples: 7e9, 7B, 2T)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {text!r}")
    return value


def format_plan(plan: GrowthPlan) -> str:
    """The plan as a header and a table: base, grown, total, and the scratch run with the same compute."""
    g = plan.growth_factor
    published = GrowthTimingLaw()
    law_source = "as published" if plan.law.is_paper else f"overridden; published: {published.describe()}"
    factor_source = ("the paper's recommendation" if g == PAPER_GROWTH_FACTOR
                     else f"the paper recommends {PAPER_GROWTH_FACTOR}")
    lines = [
        "G_stack growth plan (arXiv 2405.15319)",
        f"  timing law     {plan.law.describe()}   ({law_source})",
        f"  target         N = {format_count(plan.target_params)} parameters",
        f"  compute        C = {plan.compute_flops:.3g} FLOPs  (C = 6 * N * D)",
        f"  growth factor  g = {g}  ({factor_source})",
        "",
    ]

    def shape(config) -> tuple[str, str]:
        return ("-", "-") if config is None else (str(config.num_layers), str(config.hidden_size))

    approx = "" if plan.base_config is not None else "~"
    rows = [
        ("base, from scratch", *shape(plan.base_config), approx + format_count(plan.base_params),
         format_count(plan.growth_tokens), f"{plan.base_flops:.3g}"),
        (f"grown by G_stack (x{g})", *shape(plan.target_config), format_count(plan.target_params),
         format_count(plan.grown_tokens), f"{plan.grown_flops:.3g}"),
        ("total", "", "", "", format_count(plan.total_tokens), f"{plan.compute_flops:.3g}"),
        ("scratch reference", *shape(plan.target_config), format_count(plan.target_params),
         format_count(plan.scratch_tokens), f"{plan.compute_flops:.3g}"),
    ]
    header = ("stage", "layers", "hidden", "params", "tokens", "FLOPs")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = (cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells))
    lines += ["", f"Train the base model for {format_count(plan.growth_tokens)} tokens, stack it {g} times, "
                  f"then train the grown model for {format_count(plan.grown_tokens)} tokens."]
    if plan.target_params < SMALLEST_STUDIED_TARGET:
        lines.append(f"Note: the paper's smallest target had {format_count(SMALLEST_STUDIED_TARGET)} parameters; "
                     f"for {format_count(plan.target_params)} the timing law is an extrapolation.")
    if plan.target_config is not None:
        preset_params = num_parameters(plan.target_config)
        if abs(preset_params - plan.target_params) > 0.05 * plan.target_params:
            lines.append(f"Note: the preset has {format_count(preset_params)} parameters; the law and the budget use "
                         f"--target-params {format_count(plan.target_params)}.")
    if plan.base_config is None:
        lines.append("Base parameters are approximate (N / g; embeddings are not stacked): pass --model-preset "
                     "for an exact count.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--target-params", metavar="N", help="parameters of the grown model (e.g. 7B, 6.7e9); "
                                                              "default: counted from --model-preset")
    parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), help="shape of the grown model")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--compute", metavar="C", help="FLOPs of the whole run (e.g. 8.4e22)")
    budget.add_argument("--tokens", metavar="D", help="tokens of the whole run; compute is then 6 * N * D")
    parser.add_argument("--growth-factor", type=int, metavar="G",
                        help=f"default: {PAPER_GROWTH_FACTOR}, or the nearest factor dividing the preset's depth")
    law = GrowthTimingLaw()
    parser.add_argument("--law-a", type=float, default=law.a, help="override the timing law's a (default %(default)s)")
    parser.add_argument("--law-b", type=float, default=law.b, help="override the timing law's b (default %(default)s)")
    parser.add_argument("--law-c", type=float, default=law.c, help="override the timing law's c (default %(default)s)")
    args = parser.parse_args(argv)
    if args.target_params is None and args.model_preset is None:
        parser.error("give --target-params N or --model-preset P")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> GrowthPlan:
    """Print the plan; returns it, for tests."""
    args = parse_args(argv)
    target_config = None if args.model_preset is None else model_preset(args.model_preset)
    if args.target_params is not None:
        target_params = parse_count("--target-params", args.target_params)
    else:
        target_params = num_parameters(target_config)
    if args.compute is not None:
        compute = parse_count("--compute", args.compute)
    else:
        compute = training_compute(target_params, parse_count("--tokens", args.tokens))
    plan = plan_growth(compute, target_params=target_params, target_config=target_config,
                       growth_factor=args.growth_factor, law=GrowthTimingLaw(args.law_a, args.law_b, args.law_c))
    print(format_plan(plan))
    return plan


if __name__ == "__main__":
    main()
