"""Summary of the CPU quickstart: base -> grown (G_stack) beside a scratch run, as a table and a loss plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.errors import UserError, exit_on_user_error
from megagrow.training.loss_curves import Curve, plot_validation_curves, tokens_to_reach, validation_curve
from megagrow.training.metrics import read_metrics


def _leg(label: str, metrics: Path, start_tokens: int) -> tuple[list[str], int]:
    """One table row (tokens trained in this leg, last losses) and the tokens consumed at its end."""
    if not metrics.is_file():
        raise UserError(f"{metrics}: no metrics file; did the {label} run finish?")
    train = read_metrics(metrics, "train")
    valid = read_metrics(metrics, "valid")
    if not train:
        raise UserError(f"{metrics}: no training records; did the {label} run log any iteration?")
    end_tokens = train[-1]["consumed_tokens"]
    last_valid = f"{valid[-1]['loss']:.4f}" if valid else "-"
    row = [label, f"{start_tokens:,} -> {end_tokens:,}", f"{train[-1]['step']}", f"{train[-1]['loss']:.4f}", last_valid]
    return row, end_tokens


def growth_verdict(grown_curve: Curve, scratch_curve: Curve) -> str:
    """One plain sentence: did base -> grown reach scratch's final validation loss, and with how many tokens."""
    total, target = scratch_curve[-1]
    reached = tokens_to_reach(grown_curve, target)
    if reached is None:
        return (f"Base then grown did not reach the scratch run's final validation loss ({target:.4f}) within the "
                f"same {total:,} tokens; its own last validation loss is {grown_curve[-1][1]:.4f}.")
    return (f"Base then grown reached the scratch run's final validation loss ({target:.4f}) after {reached:,.0f} "
            f"tokens, where scratch needed {total:,}: {1 - reached / total:.1%} fewer tokens.")


def summary(rows: list[list[str]], grown_curve: Curve, scratch_curve: Curve | None) -> str:
    """Markdown table of the legs, and how many tokens base -> grown needed to reach scratch's final loss."""
    lines = ["| run | tokens | last iteration | last train loss | last validation loss |", "|---|--:|--:|--:|--:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if scratch_curve and grown_curve:
        lines += ["", growth_verdict(grown_curve, scratch_curve),
                  "(One seed and a few evaluation batches: read it as a smoke test, not as a result.)"]
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> None:
    """Print the summary table, write it as markdown and write the loss plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="metrics.jsonl of the base run")
    parser.add_argument("--grown", type=Path, required=True, help="metrics.jsonl of the grown run (continues the base)")
    parser.add_argument("--scratch", type=Path, help="metrics.jsonl of a scratch run of the grown model's size")
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--grown-label", default="grown")
    parser.add_argument("--scratch-label", default="scratch")
    parser.add_argument("--plot", type=Path, required=True, help="PNG of validation loss against tokens")
    parser.add_argument("--summary", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    base_row, grown_at = _leg(args.base_label, args.base, 0)
    rows = [base_row, _leg(args.grown_label, args.grown, grown_at)[0]]
    chain = f"{args.base_label} -> {args.grown_label}"  # one curve: the base, then the grown model
    curves = {chain: validation_curve([args.base, args.grown])}
    if args.scratch is not None:
        rows.append(_leg(args.scratch_label, args.scratch, 0)[0])
        curves[args.scratch_label] = validation_curve(args.scratch)
    table = summary(rows, curves[chain], curves.get(args.scratch_label))
    print(table)
    try:
        plot_validation_curves(curves, args.plot, markers={"growth": grown_at}, title="megagrow CPU quickstart")
        if args.summary:
            args.summary.write_text(table + "\n")
    except OSError as err:
        raise UserError(f"cannot write the report ({err.strerror or err}); check the output directory") from None
    print(f"plot: {args.plot}" + (f"   table: {args.summary}" if args.summary else ""))


if __name__ == "__main__":
    main()
