"""Choose a data mixture: from entropy proxies (no training run), or by fitting the BiMix law on a few runs.

    python tools/mixture.py entropy --data-path data/code_text_document data/prose_text_document
    python tools/mixture.py fit --runs runs/a/metrics.jsonl runs/b/metrics.jsonl --target-step 100000 --plot bimix.png

`entropy` samples up to --max-tokens tokens of each domain (whole documents, seeded), prints
unigram, conditional and joint entropies in nats, and turns one of them into proportions.
`fit` fits L_i(s, r_i) = (A_i / s^alpha_i + C_i) / r_i^beta_i per domain on the runs' per-domain
validation losses (record format: megagrow/mixing/runs.py), prints the coefficients and R^2,
and solves for the mixture minimising the (weighted) summed loss at --target-step.
Both end with a `--data-path` line ready to paste into pretraining. Method notes and what the
BiMix paper says: megagrow/mixing/entropy.py and megagrow/mixing/bimix.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megagrow.data.blended_dataset import write_data_path_file
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.errors import UserError, exit_on_user_error
from megagrow.mixing.bimix import DomainFit, fit_domain, mixture_loss, optimal_mixture
from megagrow.mixing.entropy import MAPPINGS, PROXIES, EntropyEstimates, dataset_entropies, mixture_from_entropies
from megagrow.mixing.runs import RunLosses, domain_names, parse_mixture, pool_observations, read_run

WEIGHT_DIGITS = 6


def round_weights(weights: Sequence[float], digits: int = WEIGHT_DIGITS) -> list[float]:
    """Weights rounded to `digits` decimals that still sum to exactly 1 (largest remainders round up)."""
    weights = np.asarray(weights, dtype=np.float64)
    scale = 10**digits
    exact = weights / weights.sum() * scale
    units = np.floor(exact).astype(np.int64)
    shortfall = scale - int(units.sum())
    units[np.argsort(units - exact)[:shortfall]] += 1  # most-truncated first
    return [int(u) / scale for u in units]


def format_data_path(prefixes: Sequence[str], weights: Sequence[float]) -> str:
    """`--data-path w1 p1 w2 p2 ...` with weights that sum to 1 and shell-quoted prefixes."""
    pairs = (f"{w:.{WEIGHT_DIGITS}f} {shlex.quote(p)}" for w, p in zip(round_weights(weights), prefixes))
    return "--data-path " + " ".join(pairs)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    )


def _write_mix_file(path: str | None, weights: Sequence[float], prefixes: Sequence[str], comment: str) -> None:
    """Also write the mixture as a file for `pretrain_gpt.py --data-path @path`, when --mix-file is given."""
    if path:
        write_data_path_file(path, weights, prefixes, comment)
        print(f"wrote {path} (pass --data-path @{path})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# entropy


@dataclass(frozen=True)
class EntropyResult:
    """What `entropy` printed: per-domain estimates and the proportions they give."""

    prefixes: list[str]
    estimates: list[EntropyEstimates]
    weights: np.ndarray
    data_path: str


def run_entropy(args: argparse.Namespace) -> EntropyResult:
    """Estimate each domain's entropies, print them and the mixture from the chosen proxy."""
    datasets = [IndexedDataset(prefix) for prefix in args.data_path]  # fail on a bad prefix before any work
    estimates = []
    for prefix, dataset in zip(args.data_path, datasets):
        started = time.perf_counter()
        try:
            estimate = dataset_entropies(dataset, args.max_tokens, args.seed, progress=sys.stderr.isatty())
        except ValueError as err:
            raise UserError(f"{prefix}: {err}") from None
        seconds = time.perf_counter() - started
        print(f"{prefix}: {estimate.tokens:,} tokens from {estimate.documents:,} documents in {seconds:.2f} s "
              f"({estimate.tokens / max(seconds, 1e-9):,.0f} tokens/s)", file=sys.stderr)
        if estimate.tokens < args.max_tokens:
            print(f"note: {prefix} has only {estimate.tokens:,} tokens (< --max-tokens {args.max_tokens:,}); plug-in "
                  f"entropies of a smaller sample are biased lower, so compare its proportion with care", file=sys.stderr)
        estimates.append(estimate)

    values = [e.proxy(args.proxy) for e in estimates]
    try:
        weights = mixture_from_entropies(values, args.mapping, args.temperature)
    except ValueError as err:
        raise UserError(f"weights from the {args.proxy} entropy (--mapping {args.mapping}): {err}") from None
    rounded = round_weights(weights)
    rows = [
        [p, f"{e.tokens:,}", f"{e.documents:,}", f"{e.unigram_nats:.4f}", f"{e.conditional_nats:.4f}",
         f"{e.joint_nats:.4f}", f"{e.distinct_pairs:,}", f"{w:.4f}"]
        for p, e, w in zip(args.data_path, estimates, rounded)
    ]
    header = ["dataset", "tokens", "documents", "H(X)", "H(X'|X)", "H(X,X')", "distinct pairs", "weight"]
    print(format_table(header, rows))
    how = "H / sum(H)" if args.mapping == "normalise" else f"softmax(H / {args.temperature:g})"
    print(f"entropies in nats over in-document token pairs; weights = {how} of the {args.proxy} entropy")
    data_path = format_data_path(args.data_path, weights)
    print(data_path)
    _write_mix_file(args.mix_file, rounded, args.data_path, f"mixture.py entropy: {how} of the {args.proxy} entropy")
    return EntropyResult(list(args.data_path), estimates, weights, data_path)


# ----------------------------------------------------------------------------------------------
# fit


@dataclass(frozen=True)
class FitResult:
    """What `fit` printed: per-domain fits, the target step and the optimal mixture."""

    fits: list[DomainFit]
    target_step: int
    optimum: dict[str, float]
    data_path: str


def _read_runs(args: argparse.Namespace) -> list[RunLosses]:
    """Every run of --runs, with --mixtures overriding the files' mixture records when given."""
    if len(args.runs) < 2:
        raise UserError(
            f"--runs: {len(args.runs)} run given; fitting beta needs at least 2 runs with different mixtures"
        )
    if args.mixtures is not None and len(args.mixtures) != len(args.runs):
        raise UserError(f"--mixtures: {len(args.mixtures)} mixtures for {len(args.runs)} runs; give one per run, in --runs order")
    overrides = [parse_mixture(m) for m in args.mixtures] if args.mixtures else [None] * len(args.runs)
    return [read_run(path, mixture) for path, mixture in zip(args.runs, overrides)]


def _named_values(text: str | None, domains: list[str], flag: str) -> list[float] | None:
    """Per-domain values from 'a=1,b=2' in `domains` order; None when the flag is absent."""
    if text is None:
        return None
    values = parse_mixture(text, flag)
    if set(values) != set(domains):
        raise UserError(f"{flag}: names {', '.join(sorted(values))} differ from the runs' domains {', '.join(sorted(domains))}")
    return [values[d] for d in domains]


def _prefixes(args: argparse.Namespace, runs: list[RunLosses], domains: list[str]) -> list[str]:
    """Dataset prefix per domain: --prefix flags, else the runs' mixture records, else the domain name."""
    known = {}
    for run in runs:
        known.update(run.prefixes)
    for item in args.prefix or []:
        name, sep, prefix = item.partition("=")
        if not sep or name not in domains or not prefix:
            raise UserError(f"--prefix {item!r}: expected DOMAIN=PREFIX with DOMAIN one of {', '.join(domains)}")
        known[name] = prefix
    missing = [d for d in domains if d not in known]
    if missing:
        print(f"note: no dataset prefix known for {', '.join(missing)}; the --data-path line uses the domain name "
              f"(record 'prefixes' in the mixture record, or pass --prefix DOMAIN=PREFIX)", file=sys.stderr)
    return [known.get(d, d) for d in domains]


def _run_label(path: str) -> str:
    """Short name of a run for the plot legend: its directory for `.../NAME/metrics.jsonl`, else the file stem."""
    file = Path(path)
    return file.parent.name if file.name == "metrics.jsonl" and file.parent.name else file.stem


def run_fit(args: argparse.Namespace) -> FitResult:
    """Fit the law per domain, print the coefficients and the optimal mixture, and plot the fits."""
    started = time.perf_counter()
    runs = _read_runs(args)
    domains = domain_names(runs)
    observations = pool_observations(runs, args.min_step)
    points = sum(o.losses.size for o in observations.values())
    print(f"read {len(runs)} runs, {len(domains)} domains, {points} points in {time.perf_counter() - started:.2f} s",
          file=sys.stderr)

    fits = []
    for domain in domains:
        started = time.perf_counter()
        seen = observations[domain]
        fits.append(fit_domain(domain, seen.steps, seen.proportions, seen.losses))
        print(f"fitted {domain} on {seen.losses.size} points in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    rows = [[f.domain, f"{f.params.A:.4g}", f"{f.params.alpha:.4f}", f"{f.params.C:.4f}", f"{f.params.beta:.4f}",
             f"{f.r_squared:.5f}", str(f.points)] for f in fits]
    print(format_table(["domain", "A", "alpha", "C", "beta", "R^2", "points"], rows))

    last_fitted_step = int(max(o.steps.max() for o in observations.values()))
    target_step = args.target_step or last_fitted_step
    if target_step > 2 * last_fitted_step:
        # The law is fitted on early curves; far past them its prediction is a guess
        # (examples/bimix_cpu measured it under-predicting the drop at 2x).
        print(f"note: --target-step {target_step:,} is {target_step / last_fitted_step:.1f}x the last fitted step "
              f"{last_fitted_step:,}; the predicted losses are an extrapolation", file=sys.stderr)
    domain_weights = _named_values(args.domain_weights, domains, "--domain-weights")
    params = [f.params for f in fits]
    try:
        optimum = optimal_mixture(params, target_step, domain_weights, args.min_proportion)
    except ValueError as err:
        raise UserError(f"--min-proportion/--domain-weights: {err}") from None
    mixtures = [("optimum", optimum)] + [(run.path, [run.mixture[d] for d in domains]) for run in runs]
    rows = [[label, *(f"{p.loss(target_step, r):.4f}" for p, r in zip(params, mixture)),
             f"{mixture_loss(params, target_step, mixture, domain_weights):.4f}"] for label, mixture in mixtures]
    print(f"predicted validation loss at step {target_step:,}:")
    print(format_table(["mixture", *domains, "weighted sum"], rows))
    optimum_by_domain = dict(zip(domains, (float(r) for r in optimum)))
    if args.plot:
        from megagrow.mixing.plot import plot_fits

        labels = [_run_label(run.path) for run in runs]
        try:
            plot_fits(args.plot, fits, observations, labels, optimum_by_domain, target_step)
        except OSError as err:
            raise UserError(f"--plot {args.plot}: cannot write the image ({err.strerror or err}); check the directory") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    prefixes = _prefixes(args, runs, domains)
    data_path = format_data_path(prefixes, optimum)
    print(data_path)
    _write_mix_file(args.mix_file, round_weights(optimum), prefixes,
                    f"mixture.py fit: BiMix optimum at step {target_step} from {len(runs)} runs")
    return FitResult(fits, target_step, optimum_by_domain, data_path)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags of both subcommands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)

    entropy = commands.add_parser("entropy", help="mixture from per-domain entropies (no training)")
    entropy.add_argument("--data-path", nargs="+", required=True, metavar="PREFIX", help="one dataset prefix per domain")
    entropy.add_argument("--max-tokens", type=int, default=10_000_000, help="tokens sampled per domain (default 10M)")
    entropy.add_argument("--seed", type=int, default=0, help="seed of the document order of the sample")
    entropy.add_argument("--proxy", choices=PROXIES, default="conditional", help="entropy turned into weights")
    entropy.add_argument("--mapping", choices=MAPPINGS, default="normalise", help="H/sum(H) or softmax(H/T)")
    entropy.add_argument("--temperature", type=float, default=1.0, help="T of --mapping softmax, in nats")
    entropy.add_argument("--mix-file", metavar="TXT", help="also write the mixture here, for --data-path @TXT")

    fit = commands.add_parser("fit", help="fit BiMix on runs and solve for the best mixture")
    fit.add_argument("--runs", nargs="+", required=True, metavar="METRICS_JSONL", help="metrics files of runs with different mixtures")
    fit.add_argument("--mixtures", nargs="+", metavar="D=W,...", help="each run's weights, e.g. code=0.3,prose=0.7 (when the files have none)")
    fit.add_argument("--target-step", type=int, help="step to optimise the loss at (default: the last step seen)")
    fit.add_argument("--domain-weights", metavar="D=W,...", help="weights of the domains' losses in the objective (default equal)")
    fit.add_argument("--min-step", type=int, default=1, help="ignore evaluations before this step (warm-up is off the law)")
    fit.add_argument("--min-proportion", type=float, default=1e-4, help="lower bound of every proportion")
    fit.add_argument("--prefix", nargs="+", metavar="DOMAIN=PREFIX", help="dataset prefix of each domain, for --data-path")
    fit.add_argument("--plot", metavar="PNG", help="write observed vs fitted curves here")
    fit.add_argument("--mix-file", metavar="TXT", help="also write the mixture here, for --data-path @TXT")
    args = parser.parse_args(argv)
    if args.command == "entropy" and args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    if args.command == "fit" and args.target_step is not None and args.target_step < 1:
        parser.error("--target-step must be at least 1")
    if args.command == "fit" and not 0 < args.min_proportion < 1:
        parser.error("--min-proportion must lie between 0 and 1")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> EntropyResult | FitResult:
    """Run one subcommand; returns what it printed, for tests."""
    args = parse_args(argv)
    return run_entropy(args) if args.command == "entropy" else run_fit(args)


if __name__ == "__main__":
    main()
