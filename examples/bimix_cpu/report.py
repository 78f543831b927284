"""Table and plot of the BiMix CPU example's final runs: per-domain validation loss of each mixture and seed.

    python examples/bimix_cpu/report.py --final-dir runs/bimix_cpu/final --fit-dir runs/bimix_cpu/fit \
        --plot runs/bimix_cpu/curves.png

Expects `{final-dir}/seed{N}/{mixture}/metrics.jsonl` as written by examples/bimix_cpu/run.sh, and prints
Markdown: each run's weights and last per-domain validation losses, their mean over domains, the mean
over seeds when there are several, and what the BiMix law fitted on the fit runs predicts for each mixture.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from megagrow.training.metrics import read_metrics

MIXTURES = ("uniform", "entropy", "fitted")  # the order of the table rows


def fail(message: str) -> None:
    """Print a one-line error and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_run(path: Path) -> dict:
    """Weights, and per-domain validation curves {domain: (steps, losses)} of one run's metrics file."""
    if not path.is_file():
        fail(f"{path} not found; run examples/bimix_cpu/run.sh first")
    records = read_metrics(path)
    mixture = next((r for r in records if r.get("kind") == "mixture"), None)
    valid = [r for r in records if r.get("kind") == "valid" and isinstance(r.get("domain_losses"), dict)]
    if mixture is None or not valid:
        fail(f"{path} has no mixture record or no per-domain validation loss; did the run finish?")
    curves = {}
    for record in valid:
        for domain, loss in record["domain_losses"].items():
            curves.setdefault(domain, ([], []))
            curves[domain][0].append(record["step"])
            curves[domain][1].append(loss)
    return {"weights": mixture["weights"], "curves": curves, "blend": valid[-1]["loss"], "step": valid[-1]["step"]}


def fitted_laws(fit_dir: Path, min_step: int) -> dict:
    """BiMix parameters per domain, refitted (as tools/mixture.py fit does) on the fit runs under `fit_dir`."""
    from megagrow.mixing.bimix import fit_domain
    from megagrow.mixing.runs import domain_names, pool_observations, read_run

    paths = sorted(fit_dir.glob("*/metrics.jsonl"))
    if len(paths) < 2:
        return {}
    runs = [read_run(p) for p in paths]
    observations = pool_observations(runs, min_step)
    return {d: fit_domain(d, o.steps, o.proportions, o.losses).params
            for d, o in ((d, observations[d]) for d in domain_names(runs))}


def markdown(runs: dict[int, dict[str, dict]], laws: dict) -> str:
    """Markdown tables: one row per (seed, mixture), then the mean over seeds."""
    first = next(iter(next(iter(runs.values())).values()))
    domains = list(first["curves"])
    step = first["step"]
    head = (f"| seed | mixture | {' | '.join(f'w {d}' for d in domains)} | "
            f"{' | '.join(f'loss {d}' for d in domains)} | mean of domains | blend valid |")
    lines = [f"Validation loss (nats/token) after {step} iterations; lower is better.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    # "blend valid" is the loss on the run's own mixture of the domains' validation sets: it is not
    # comparable across mixtures, unlike the per-domain losses and their mean.
    means: dict[str, list[list[float]]] = {}
    for seed, by_mixture in sorted(runs.items()):
        for name in MIXTURES:
            if name not in by_mixture:
                continue
            run = by_mixture[name]
            last = [run["curves"][d][1][-1] for d in domains]
            means.setdefault(name, []).append(last)
            weights = " | ".join(f"{run['weights'][d]:.3f}" for d in domains)
            losses = " | ".join(f"{v:.4f}" for v in last)
            lines.append(f"| {seed} | {name} | {weights} | {losses} | {np.mean(last):.4f} | {run['blend']:.4f} |")
    if len(runs) > 1:
        lines += ["", "Mean over seeds (± half the spread between seeds):", "",
                  f"| mixture | seeds | {' | '.join(domains)} | mean of domains |", "|---|---|" + "---|" * (len(domains) + 1)]
        for name, rows in means.items():
            rows = np.asarray(rows)
            per_run_mean = rows.mean(axis=1)
            cells = [f"{rows[:, j].mean():.4f} ± {np.ptp(rows[:, j]) / 2:.4f}" for j in range(len(domains))]
            lines.append(f"| {name} | {len(rows)} | {' | '.join(cells)} | {per_run_mean.mean():.4f} ± {np.ptp(per_run_mean) / 2:.4f} |")
    if laws:
        note = (f"What the law fitted on the fit runs predicts at step {step} for the same mixtures "
                f"(an extrapolation from shorter runs), beside the measured seed mean:")
        lines += ["", note, "",
                  f"| mixture | {' | '.join(f'predicted {d}' for d in domains)} | predicted mean | measured mean |",
                  "|---|" + "---|" * (len(domains) + 2)]
        for name, rows in means.items():
            weights = next(iter(runs.values())).get(name, first)["weights"]
            total = sum(weights.values())
            predicted = [float(laws[d].loss(step, weights[d] / total)) for d in domains]
            cells = " | ".join(f"{v:.4f}" for v in predicted)
            lines.append(f"| {name} | {cells} | {np.mean(predicted):.4f} | {np.mean(rows):.4f} |")
    return "\n".join(lines)


def plot(runs: dict[int, dict[str, dict]], path: Path) -> None:
    """One panel per domain (and one for the mean of domains): validation loss against step, per mixture and seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    first = next(iter(next(iter(runs.values())).values()))
    domains = list(first["curves"])
    figure, axes = plt.subplots(1, len(domains) + 1, figsize=(4.2 * (len(domains) + 1), 3.6))
    colours = dict(zip(MIXTURES, ("tab:grey", "tab:blue", "tab:red")))
    styles = ("-", "--", ":", "-.")
    for k, (seed, by_mixture) in enumerate(sorted(runs.items())):
        for name, run in by_mixture.items():
            label = f"{name} (seed {seed})" if len(runs) > 1 else name
            for axis, domain in zip(axes, domains):
                steps, losses = run["curves"][domain]
                axis.plot(steps, losses, styles[k % len(styles)], color=colours.get(name), marker="o", ms=3, label=label)
            steps = run["curves"][domains[0]][0]
            mean = np.mean([run["curves"][d][1] for d in domains], axis=0)
            axes[-1].plot(steps, mean, styles[k % len(styles)], color=colours.get(name), marker="o", ms=3, label=label)
    for axis, title in zip(axes, [*domains, "mean of domains"]):
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    """Read every final run, print the Markdown table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--final-dir", type=Path, required=True, help="directory holding seed*/MIXTURE/metrics.jsonl")
    parser.add_argument("--fit-dir", type=Path, help="fit runs (*/metrics.jsonl), for the law's predictions")
    parser.add_argument("--min-step", type=int, default=20, help="the --min-step the fit used (run.sh: FIT_EVAL)")
    parser.add_argument("--plot", type=Path, help="PNG of the validation curves")
    args = parser.parse_args()
    runs: dict[int, dict[str, dict]] = {}
    for seed_dir in sorted(args.final_dir.glob("seed*")):
        match = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not match:
            continue
        found = {name: load_run(seed_dir / name / "metrics.jsonl") for name in MIXTURES if (seed_dir / name / "done").is_file()}
        if found:
            runs[int(match.group(1))] = found
    if not runs:
        fail(f"no finished run under {args.final_dir} (expected seed*/uniform/metrics.jsonl and a 'done' marker)")
    print(markdown(runs, fitted_laws(args.fit_dir, args.min_step) if args.fit_dir else {}))
    if args.plot:
        plot(runs, args.plot)
        print(f"\nwrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
