"""Loss-vs-tokens plot and table of the G_stack example: each grown run against the scratch run of its size."""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.training.loss_curves import plot_validation_curves, tokens_to_reach, validation_curve

# grown run -> scratch run of the same final model
PAIRS = {"gstack_x2": "scratch_4L", "gstack_x4": "scratch_8L"}


def table(curves: dict, grow_tokens: int) -> str:
    """Markdown table: final losses and the tokens each grown model needs to reach its scratch model's final loss."""
    header = ("| run | vs | final val loss (grown) | final val loss (scratch) | tokens to reach scratch's final loss "
              "| saving |")
    lines = [header, "|---|---|---|---|---|---|"]
    for grown, scratch in PAIRS.items():
        if grown not in curves or scratch not in curves:
            continue
        total, target = curves[scratch][-1]
        reached = tokens_to_reach(curves[grown], target)
        saving = f"{1 - reached / total:.1%}" if reached is not None else "-"
        reach = f"{reached:,.0f} of {total:,}" if reached is not None else f"not reached in {total:,}"
        lines.append(f"| {grown} (grown at {grow_tokens:,} tokens) | {scratch} | {curves[grown][-1][1]:.4f} | "
                     f"{target:.4f} | {reach} | {saving} |")
    return "\n".join(lines)


def main() -> None:
    """Read the runs' metrics files, print the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True, help="directory of {run}.jsonl metrics files")
    parser.add_argument("--tokens-per-iteration", type=int, required=True)
    parser.add_argument("--grow-iteration", type=int, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    args = parser.parse_args()
    curves = {path.stem: validation_curve(path, args.tokens_per_iteration) for path in sorted(args.runs.glob("*.jsonl"))}
    grow_tokens = args.grow_iteration * args.tokens_per_iteration
    print(table(curves, grow_tokens))
    plot_validation_curves(curves, args.plot, markers={"growth": grow_tokens})
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
