"""Summarise a training run's metrics JSONL: training loss over time and validation losses."""

import argparse
import math

from megagrow.errors import UserError, exit_on_user_error
from megagrow.training.metrics import read_metrics


def summarize(path: str, rows: int = 8) -> str:
    """A small text table of a run: evenly spaced training records and every validation record."""
    try:
        train = read_metrics(path, "train")
        valid = read_metrics(path, "valid")
    except OSError as err:
        raise UserError(f"{path}: cannot read the metrics file ({err.strerror}); check --metrics-file") from None
    if not train:
        raise UserError(f"{path}: no training records; did the run log at least one --log-interval?")
    step = max(1, math.ceil(len(train) / rows))
    picked = train[::step] + ([train[-1]] if (len(train) - 1) % step else [])
    lines = [f"{'iteration':>9}  {'tokens':>12}  {'train loss':>10}  {'tok/s':>9}"]
    lines += [f"{r['step']:>9}  {r['consumed_tokens']:>12,}  {r['loss']:>10.4f}  {r['tokens_per_second']:>9,.0f}"
              for r in picked]
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


@exit_on_user_error
def main(argv=None):
    """Print the summary of one metrics file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics_file", help="metrics.jsonl written by pretrain_gpt.py")
    parser.add_argument("--rows", type=int, default=8, help="training records to show")
    args = parser.parse_args(argv)
    print(summarize(args.metrics_file, args.rows))


if __name__ == "__main__":
    main()
