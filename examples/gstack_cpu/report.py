"""Table and two-panel plot of the G_stack example: each grown run against the scratch run of its size, at equal
tokens and at equal training FLOPs."""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.training.loss_curves import FLOPS, TOKENS, compare_runs, plot_validation_curves, run_curves
from megagrow.training.metrics import read_metrics

# grown run -> scratch run of the same final model
PAIRS = {"gstack_x2": "scratch_4L", "gstack_x4": "scratch_8L"}


def _share(needed: float | None, total: float, fmt: str) -> str:
    return f"{needed:{fmt}} ({needed / total:.0%})" if needed is not None else "not reached"


def table(curves: dict) -> str:
    """Markdown table: final losses, and the tokens and FLOPs each grown model needs to reach its scratch model's
    final loss (share of scratch's)."""
    lines = ["| run | vs | final val loss (grown) | final val loss (scratch) | tokens to reach scratch's final loss "
             "| FLOPs to reach it |", "|---|---|--:|--:|--:|--:|"]
    for grown, scratch in PAIRS.items():
        if grown not in curves or scratch not in curves:
            continue
        c = compare_runs(curves[grown], curves[scratch])
        flops = _share(c.needed[FLOPS], c.reference_total[FLOPS], ".3g") if FLOPS in c.needed else "-"
        lines.append(f"| {grown} | {scratch} | {c.final:.4f} | {c.target:.4f} | "
                     f"{_share(c.needed[TOKENS], c.reference_total[TOKENS], ',.0f')} | {flops} |")
    return "\n".join(lines)


def _growth_positions(metrics: Path, iteration: int) -> dict[str, float]:
    """Tokens and FLOPs at the growth: the base's evaluation at its last iteration."""
    for record in read_metrics(metrics, "valid"):
        if record["step"] == iteration:
            return {axis: record[f"consumed_{axis}"] for axis in (TOKENS, FLOPS) if f"consumed_{axis}" in record}
    return {}


def main() -> None:
    """Read the runs' metrics files, print the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True, help="directory of {run}.jsonl metrics files")
    parser.add_argument("--grow-iteration", type=int, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    args = parser.parse_args()
    curves = {path.stem: run_curves(path) for path in sorted(args.runs.glob("*.jsonl"))}
    print(table(curves))
    growth = _growth_positions(args.runs / "gstack_x2.jsonl", args.grow_iteration)
    plot_validation_curves(curves, args.plot, markers={"growth": growth})
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
