"""Validation loss against tokens, read from metrics files: to compare runs (grown vs scratch) and plot them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import pairwise

from megagrow.training.metrics import read_metrics

Curve = list[tuple[int, float]]  # (tokens consumed, validation loss), by increasing tokens


def validation_curve(paths: str | os.PathLike | Sequence[str | os.PathLike],
                     tokens_per_iteration: int | None = None) -> Curve:
    """Every validation loss of one run (or of its legs, files in order) against the tokens consumed.

    Records written before validation records carried `consumed_tokens` need `tokens_per_iteration`.
    A later leg replaces the points of an earlier one from its first token count on (a resumed run).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    curve: Curve = []
    for path in paths:
        for record in read_metrics(path, "valid"):
            if "consumed_tokens" in record:
                tokens = int(record["consumed_tokens"])
            elif tokens_per_iteration is not None:
                tokens = int(record["step"]) * tokens_per_iteration
            else:
                raise ValueError(f"{path}: validation records without consumed_tokens; give tokens_per_iteration")
            while curve and curve[-1][0] >= tokens:
                curve.pop()
            curve.append((tokens, float(record["loss"])))
    return curve


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """Tokens at which the curve first reaches `target`, interpolated between evaluations; None if never."""
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    for (t0, l0), (t1, l1) in pairwise(curve):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def plot_validation_curves(curves: Mapping[str, Curve], path: str | os.PathLike, *,
                           markers: Mapping[str, int] | None = None, title: str | None = None) -> None:
    """Write a PNG of validation loss against tokens: runs named scratch* dashed, `markers` as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        axis.plot([t for t, _ in curve], [loss for _, loss in curve], label=name,
                  linestyle="--" if name.startswith("scratch") else "-", marker="." if len(curve) < 30 else None)
    for label, tokens in (markers or {}).items():
        axis.axvline(tokens, color="grey", linewidth=0.8, linestyle=":", label=label)
    losses = [loss for curve in curves.values() for _, loss in curve]
    if losses:  # the first evaluations of a fresh model sit near log(vocab) and would flatten the rest
        axis.set_ylim(top=min(max(losses), min(losses) + 3.0))
    axis.set_xlabel("tokens")
    axis.set_ylabel("validation loss")
    if title:
        axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
