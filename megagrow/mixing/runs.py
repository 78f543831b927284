"""Per-domain validation losses of training runs, read from their metrics JSONL, as BiMix fit data.

Records a run's metrics file must hold (written with `training.metrics.MetricsWriter`, one
JSON object per line; other kinds and other keys are ignored):

    {"kind": "mixture", "step": 0, "weights": {"code": 0.3, "prose": 0.7},
     "prefixes": {"code": "data/code_text_document", "prose": "data/prose_text_document"}}
        once, when the run starts (again on resume, unchanged). `weights` are the blend
        weights of the training data by domain name (normalised here); `prefixes` is
        optional and maps each domain to its dataset prefix, for printing `--data-path`.
    {"kind": "valid", "step": 1000, "domain_losses": {"code": 2.13, "prose": 3.02}}
        at each evaluation: mean validation loss (nats per token) of each domain's
        held-out set, after `step` optimizer steps.

`step` counts optimizer steps; runs compared in one fit must share the global batch size
and sequence length, so that a step means the same number of tokens in each. A run
without a `mixture` record takes its weights from the command line instead (`--mixtures`).
When a step was evaluated twice (a resumed run), the later record wins.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from megagrow.errors import UserError
from megagrow.training.metrics import read_metrics


@dataclass(frozen=True)
class RunLosses:
    """One run: its mixture and each domain's validation loss curve."""

    path: str
    mixture: dict[str, float]  # normalised weights by domain name
    steps: dict[str, np.ndarray]  # domain -> ascending steps with a loss
    losses: dict[str, np.ndarray]  # domain -> loss at those steps
    prefixes: dict[str, str] = field(default_factory=dict)  # domain -> dataset prefix, when recorded


@dataclass(frozen=True)
class DomainObservations:
    """One domain's losses pooled over runs: the points the law is fitted to."""

    steps: np.ndarray
    proportions: np.ndarray
    losses: np.ndarray
    run_index: np.ndarray  # which run (position in the list of runs) each point came from


def parse_mixture(text: str, where: str = "--mixtures") -> dict[str, float]:
    """Weights by domain from 'code=0.3,prose=0.7' (normalised to sum to 1)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not math.isfinite(weight) or weight < 0:
            raise UserError(f"{where}: {item!r} is not domain=weight with a weight >= 0, e.g. code=0.3,prose=0.7")
        weights[name.strip()] = weight
    return _normalised(weights, where)


def _normalised(weights: dict[str, float], where: str) -> dict[str, float]:
    total = sum(weights.values())
    if not weights or total <= 0:
        raise UserError(f"{where}: the mixture has no positive weight; give weights like code=0.3,prose=0.7")
    return {name: weight / total for name, weight in weights.items()}


def read_run(path: str | os.PathLike, mixture: dict[str, float] | None = None) -> RunLosses:
    """The mixture and per-domain loss curves of one run's metrics file (`mixture` overrides the file's)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"metrics file not found: {path}; pass the metrics.jsonl a training run wrote")
    records = read_metrics(path)
    mixture_records = [r for r in records if r.get("kind") == "mixture"]
    prefixes = {}
    if mixture is None:
        if not mixture_records:
            raise UserError(
                f"{path}: no {{\"kind\": \"mixture\"}} record; pass this run's weights with --mixtures "
                f"(one 'code=0.3,prose=0.7' per run, in --runs order)"
            )
        mixture = _mixture_of_records(path, mixture_records)
    if mixture_records:
        prefixes = {str(k): str(v) for k, v in (mixture_records[-1].get("prefixes") or {}).items()}

    by_domain: dict[str, dict[int, float]] = {}
    for record in records:
        domain_losses = record.get("domain_losses")
        if record.get("kind") != "valid" or not isinstance(domain_losses, dict):
            continue
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        for domain, loss in domain_losses.items():
            if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss <= 0:
                raise UserError(
                    f"{path}: step {step}: loss {loss!r} of domain {domain!r} is not a positive number; "
                    f"the file is corrupt or was not written by megagrow's training loop"
                )
            by_domain.setdefault(str(domain), {})[int(step)] = float(loss)  # later record wins
    if not by_domain:
        raise UserError(
            f"{path}: no per-domain validation losses (records like "
            f"{{\"kind\": \"valid\", \"step\": 1000, \"domain_losses\": {{\"code\": 2.1}}}}); "
            f"train with per-domain validation sets"
        )
    unweighted = sorted(set(by_domain) - set(mixture))
    if unweighted:
        raise UserError(
            f"{path}: domain(s) {', '.join(unweighted)} have losses but no weight in the mixture "
            f"{_format(mixture)}; check the run's mixture record or --mixtures"
        )
    steps = {d: np.array(sorted(points), dtype=np.int64) for d, points in by_domain.items()}
    losses = {d: np.array([by_domain[d][s] for s in steps[d]], dtype=np.float64) for d in by_domain}
    return RunLosses(path, mixture, steps, losses, prefixes)


def _mixture_of_records(path: str, records: list[dict]) -> dict[str, float]:
    """The run's weights; every mixture record of the run must agree."""
    mixtures = []
    for record in records:
        weights = record.get("weights")
        if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values()):
            raise UserError(f"{path}: a mixture record has no 'weights' object of numbers: {record}")
        mixtures.append(_normalised({str(k): float(v) for k, v in weights.items()}, path))
    first = mixtures[0]
    for other in mixtures[1:]:
        if set(other) != set(first) or any(abs(other[d] - first[d]) > 1e-9 for d in first):
            raise UserError(
                f"{path}: the mixture changes within the run ({_format(first)} then {_format(other)}); "
                f"BiMix needs one fixed mixture per run"
            )
    return first


def _format(mixture: dict[str, float]) -> str:
    return ",".join(f"{d}={w:.4g}" for d, w in mixture.items())


def domain_names(runs: list[RunLosses]) -> list[str]:
    """Domains every run reports, in the first run's order; a UserError when runs disagree."""
    first = runs[0]
    names = list(first.losses)
    for run in runs[1:]:
        if set(run.losses) != set(names):
            raise UserError(
                f"mismatched domain names: {first.path} has {', '.join(sorted(names))} but {run.path} has "
                f"{', '.join(sorted(run.losses))}; fit runs that evaluate the same domains"
            )
    return names


def pool_observations(runs: list[RunLosses], min_step: int = 1) -> dict[str, DomainObservations]:
    """Each domain's (step, proportion, loss) points over all runs, steps >= min_step, proportion > 0."""
    pooled = {}
    for domain in domain_names(runs):
        columns = ([], [], [], [])
        for index, run in enumerate(runs):
            proportion = run.mixture.get(domain, 0.0)
            if proportion <= 0:  # an untrained domain is off the law (infinite predicted loss)
                continue
            keep = run.steps[domain] >= max(min_step, 1)
            count = int(keep.sum())
            columns[0].append(run.steps[domain][keep].astype(np.float64))
            columns[1].append(np.full(count, proportion))
            columns[2].append(run.losses[domain][keep])
            columns[3].append(np.full(count, index))
        steps, proportions, losses, run_index = (np.concatenate(c) if c else np.zeros(0) for c in columns)
        pooled[domain] = DomainObservations(steps, proportions, losses, run_index.astype(np.int64))
    return pooled
