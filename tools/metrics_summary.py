"""Summarise a training run's metrics JSONL: training loss over time and validation losses.

Give a run's legs in order (e.g. a base run, then the grown run that continued it) to read them
as one run, and `--compare` another run's metrics (e.g. the same model trained from scratch) to
get one sentence: with what share of that run's tokens and training FLOPs this run reaches its
final validation loss, or that it does not.
"""

import argparse
import math

from megagrow.errors import UserError, exit_on_user_error
from megagrow.training.loss_curves import compare_runs, comparison_sentence, run_curves
from megagrow.training.metrics import read_metrics


def _records(paths: list[str], kind: str) -> list[dict]:
    """The records of a run's legs, a later leg replacing an earlier one's from its first step on (a resume)."""
    records: list[dict] = []
    for path in paths:
        try:
            leg = read_metrics(path, kind)
        except OSError as err:
            raise UserError(f"{path}: cannot read the metrics file ({err.strerror}); check --metrics-file") from None
        if leg:
            records = [r for r in records if r["step"] < leg[0]["step"]] + leg
    return records


def summarize(paths: str | list[str], rows: int = 8) -> str:
    """A small text table of a run: evenly spaced training records and every validation record."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    train, valid = _records(paths, "train"), _records(paths, "valid")
    if not train:
        raise UserError(f"{paths[-1]}: no training records; did the run log at least one --log-interval?")
    step = max(1, math.ceil(len(train) / rows))
    picked = train[::step] + ([train[-1]] if (len(train) - 1) % step else [])
    lines = [f"{'iteration':>9}  {'tokens':>12}  {'FLOPs':>9}  {'train loss':>10}  {'tok/s':>9}"]
    lines += [f"{r['step']:>9}  {r['consumed_tokens']:>12,}  {_flops(r):>9}  {r['loss']:>10.4f}  "
              f"{r['tokens_per_second']:>9,.0f}" for r in picked]
    if valid:
        lines.append("")
        lines.append(f"{'iteration':>9}  {'valid loss':>10}  {'perplexity':>10}")
        lines += [f"{r['step']:>9}  {r['loss']:>10.4f}  {r['perplexity']:>10.2f}" for r in valid]
    first, last = train[0]["loss"], train[-1]["loss"]
    lines.append("")
    # A resumed run (e.g. the grown leg of the quickstart) starts logging past iteration 1: name both ends.
    lines.append(f"training loss {first:.4f} at iteration {train[0]['step']} -> {last:.4f} at iteration "
                 f"{train[-1]['step']}")
    return "\n".join(lines)


def _flops(record: dict) -> str:
    return f"{record['consumed_flops']:.3g}" if "consumed_flops" in record else "-"


def compare(paths: list[str], reference: list[str], label: str = "this run", reference_label: str = "the reference"
            ) -> str:
    """The sentence comparing a run (its legs) with a reference run at equal tokens and at equal FLOPs."""
    try:
        run, other = run_curves(paths), run_curves(reference)
    except ValueError as err:
        raise UserError(str(err)) from None
    if not run["tokens"] or not other["tokens"]:
        empty = paths[-1] if not run["tokens"] else reference[-1]
        raise UserError(f"{empty}: no validation records to compare; train with --eval-interval")
    return comparison_sentence(compare_runs(run, other), label, reference_label)


@exit_on_user_error
def main(argv=None):
    """Print the summary of a run, and with --compare how it fares against another run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics_files", nargs="+", help="metrics.jsonl written by pretrain_gpt.py (a run's legs, "
                                                         "in order)")
    parser.add_argument("--rows", type=int, default=8, help="training records to show")
    parser.add_argument("--compare", nargs="+", metavar="METRICS", help="another run's metrics.jsonl (its legs): "
                        "say what share of its tokens and FLOPs this run needs to reach its final validation loss")
    parser.add_argument("--label", default="this run", help="name of this run in the comparison")
    parser.add_argument("--compare-label", default="the reference", help="name of the other run")
    args = parser.parse_args(argv)
    print(summarize(args.metrics_files, args.rows))
    if args.compare:
        print()
        print(compare(args.metrics_files, args.compare, args.label, args.compare_label))


if __name__ == "__main__":
    main()
