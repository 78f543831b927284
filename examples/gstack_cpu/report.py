"""Loss-vs-tokens plot and table of the G_stack example: each grown run against the scratch run of its size."""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

# grown run -> scratch run of the same final model
PAIRS = {"gstack_x2": "scratch_4L", "gstack_x4": "scratch_8L"}


def validation_curve(path: Path, tokens_per_iteration: int) -> list[tuple[int, float]]:
    """(tokens consumed, validation loss) at every evaluation of a metrics file."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"] * tokens_per_iteration, r["loss"]) for r in records if r["kind"] == "valid"]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target`, interpolated between evaluations; None if never."""
    for (t0, l0), (t1, l1) in pairwise(curve):
        if l1 <= target:
            return t1 if l0 <= target or l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


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


def plot(curves: dict, grow_tokens: int, path: Path) -> None:
    """Validation loss against tokens for every run, with the growth point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, curve in sorted(curves.items()):
        axis.plot([t for t, _ in curve], [loss for _, loss in curve], label=name,
                  linestyle="--" if name.startswith("scratch") else "-")
    axis.axvline(grow_tokens, color="grey", linewidth=0.8, linestyle=":", label="growth")
    axis.set_xlabel("tokens")
    axis.set_ylabel("validation loss")
    axis.set_ylim(top=min(8.0, max(loss for curve in curves.values() for _, loss in curve)))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
    plot(curves, grow_tokens, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
