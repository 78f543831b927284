"""Summary of the CPU quickstart: base -> grown (G_stack) beside a scratch run, at equal tokens and at equal FLOPs.

Prints a table of the legs and one sentence saying with what share of scratch's tokens and
training FLOPs the grown run reaches scratch's final validation loss (or that it does not),
and writes the loss plot: validation loss against tokens and against FLOPs, two panels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.errors import UserError, exit_on_user_error
from megagrow.training.loss_curves import (
    FLOPS,
    TOKENS,
    Comparison,
    compare_runs,
    comparison_sentence,
    plot_validation_curves,
    run_curves,
)
from megagrow.training.metrics import read_metrics

# How far one seed can be trusted here: README "What the quickstart shows" gives the spread over seeds measured on
# this machine; SEEDS=3 repeats the comparison with more seeds.
SEED_CAVEAT = ("One seed: README \"What the quickstart shows\" gives how much these shares move from seed to seed; "
               "SEEDS=3 bash examples/quickstart_cpu.sh measures it here.")


def _leg(label: str, metrics: Path) -> tuple[list[str], dict]:
    """One table row (tokens and FLOPs at the leg's end, last losses) and its last training record."""
    if not metrics.is_file():
        raise UserError(f"{metrics}: no metrics file; did the {label} run finish?")
    train = read_metrics(metrics, "train")
    valid = read_metrics(metrics, "valid")
    if not train:
        raise UserError(f"{metrics}: no training records; did the {label} run log any iteration?")
    last = train[-1]
    flops = f"{last['consumed_flops']:.3g}" if "consumed_flops" in last else "-"
    last_valid = f"{valid[-1]['loss']:.4f}" if valid else "-"
    row = [label, f"{last['consumed_tokens']:,}", flops, f"{last['step']}", f"{last['loss']:.4f}", last_valid]
    return row, last


def summary(rows: list[list[str]], sentence: str | None, spread: str | None = None) -> str:
    """Markdown: the table of legs, the comparison sentence and how far it can be trusted."""
    lines = ["| run | tokens at its end | training FLOPs at its end | last iteration | last train loss "
             "| last validation loss |", "|---|--:|--:|--:|--:|--:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if sentence:
        lines += ["", sentence, "", spread or SEED_CAVEAT]
    return "\n".join(lines)


def seed_spread(comparisons: list[Comparison]) -> str:
    """How the comparison moves over seeds (one grown/scratch pair per seed), as a sentence."""
    def share_range(axis: str) -> str:
        shares = [c.needed[axis] / c.reference_total[axis] for c in comparisons if c.needed.get(axis) is not None]
        missed = sum(1 for c in comparisons if axis in c.needed and c.needed[axis] is None)
        name = "FLOPs" if axis == FLOPS else axis
        text = f"{min(shares):.0%}-{max(shares):.0%} of its {name}" if shares else f"never by {name}"
        return text + (f" ({missed} seed(s) never)" if missed and shares else "")

    targets = [c.target for c in comparisons]
    gaps = [c.final - c.target for c in comparisons]
    axes = [axis for axis in (TOKENS, FLOPS) if all(axis in c.needed for c in comparisons)]
    return (f"Over {len(comparisons)} seeds (a grown and a scratch run each) the grown run reaches scratch's final "
            f"validation loss with {' and '.join(share_range(axis) for axis in axes)}; scratch's final loss moves by "
            f"{max(targets) - min(targets):.4f} between seeds, the grown-minus-scratch gap lies between "
            f"{min(gaps):+.4f} and {max(gaps):+.4f}.")


@exit_on_user_error
def main(argv=None) -> None:
    """Print the summary, write it as markdown and write the two-panel loss plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="metrics.jsonl of the base run")
    parser.add_argument("--grown", type=Path, required=True, help="metrics.jsonl of the grown run (continues the base)")
    parser.add_argument("--scratch", type=Path, help="metrics.jsonl of the scratch run of the grown model's size")
    parser.add_argument("--seed-pairs", type=Path, nargs="*", default=[], metavar="METRICS",
                        help="more seeds: GROWN SCRATCH metrics files, in pairs (each grown run one whole run)")
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--grown-label", default="grown")
    parser.add_argument("--scratch-label", default="scratch")
    parser.add_argument("--plot", type=Path, required=True, help="PNG: validation loss against tokens and FLOPs")
    parser.add_argument("--summary", type=Path, help="also write the summary here (markdown)")
    args = parser.parse_args(argv)
    base_row, base_end = _leg(args.base_label, args.base)
    rows = [base_row, _leg(args.grown_label, args.grown)[0]]
    chain = f"{args.base_label} -> {args.grown_label}"  # one curve: the base, then the grown model
    curves = {chain: run_curves([args.base, args.grown])}
    sentence = spread = None
    if len(args.seed_pairs) % 2:
        raise UserError(f"--seed-pairs takes GROWN SCRATCH pairs; {len(args.seed_pairs)} files given")
    if args.seed_pairs and not args.scratch:
        raise UserError("--seed-pairs needs --scratch: the first seed's comparison is the one the others join")
    if args.scratch:
        rows.append(_leg(args.scratch_label, args.scratch)[0])
        curves[args.scratch_label] = run_curves(args.scratch)
        comparisons = [compare_runs(curves[chain], curves[args.scratch_label])]
        sentence = comparison_sentence(comparisons[0], "The grown run (base, then grown)", "scratch")
        for grown, scratch in zip(args.seed_pairs[::2], args.seed_pairs[1::2]):
            for label, path in ((args.grown_label, grown), (args.scratch_label, scratch)):
                _leg(label, path)  # a clear line if a seed's run did not finish
            comparisons.append(compare_runs(run_curves(grown), run_curves(scratch)))
        if len(comparisons) > 1:
            spread = seed_spread(comparisons)
    text = summary(rows, sentence, spread)
    print(text)
    growth = {TOKENS: base_end["consumed_tokens"]}
    if "consumed_flops" in base_end:
        growth[FLOPS] = base_end["consumed_flops"]
    try:
        plot_validation_curves(curves, args.plot, markers={"growth": growth}, title="megagrow CPU quickstart")
        if args.summary:
            args.summary.write_text(text + "\n")
    except OSError as err:
        raise UserError(f"cannot write the report ({err.strerror or err}); check the output directory") from None
    print(f"plot: {args.plot}" + (f"   summary: {args.summary}" if args.summary else ""))


if __name__ == "__main__":
    main()
