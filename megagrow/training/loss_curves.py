"""Validation loss against tokens and against training FLOPs, read from metrics files: to compare runs fairly.

A grown run spends its first tokens on the small base model, whose tokens cost a fraction of
the grown model's compute, so it is compared with a scratch run both at equal tokens and at
equal training compute. Compute is 6 N per token, N the parameters of the model trained at
the time (`consumed_flops` of the metrics records, carried across growth); the Gstack paper
reports its speed-up both ways.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from megagrow.training.metrics import read_metrics

TOKENS, FLOPS = "tokens", "flops"
AXES = (TOKENS, FLOPS)
Curve = list[tuple[float, float]]  # (tokens or FLOPs consumed, validation loss), increasing
Curves = dict[str, Curve]  # axis -> curve


def validation_curve(paths: str | os.PathLike | Sequence[str | os.PathLike], tokens_per_iteration: int | None = None,
                     axis: str = TOKENS) -> Curve:
    """Every validation loss of one run (or of its legs, files in order) against the tokens or FLOPs consumed.

    Records written before validation records carried `consumed_tokens` need `tokens_per_iteration`.
    A later leg replaces the points of an earlier one from its first position on (a resumed run).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    curve: Curve = []
    for path in paths:
        for record in read_metrics(path, "valid"):
            if axis == FLOPS:
                if "consumed_flops" not in record:
                    raise ValueError(f"{path}: validation records without consumed_flops (written before megagrow "
                                     f"counted training FLOPs); compare these runs by tokens only")
                position = float(record["consumed_flops"])
            elif "consumed_tokens" in record:
                position = float(record["consumed_tokens"])
            elif tokens_per_iteration is not None:
                position = float(int(record["step"]) * tokens_per_iteration)
            else:
                raise ValueError(f"{path}: validation records without consumed_tokens; give tokens_per_iteration")
            while curve and curve[-1][0] >= position:
                curve.pop()
            curve.append((position, float(record["loss"])))
    return curve


def run_curves(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Curves:
    """A run's validation curve against tokens and, where its metrics record them, against FLOPs."""
    curves = {TOKENS: validation_curve(paths)}
    try:
        curves[FLOPS] = validation_curve(paths, axis=FLOPS)
    except ValueError:
        pass
    return curves


def amount_to_reach(curve: Curve, target: float) -> float | None:
    """Tokens (or FLOPs) at which the curve first reaches `target`, interpolated between evaluations; None if never."""
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    for (t0, l0), (t1, l1) in pairwise(curve):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


@dataclass
class Comparison:
    """How a run compares with a reference run: what it needs to reach the reference's final validation loss."""

    target: float  # the reference's final validation loss
    final: float  # the run's own final validation loss
    needed: dict[str, float | None]  # axis -> amount the run needs to reach the target (None: not reached)
    reference_total: dict[str, float]  # axis -> what the reference spent
    run_total: dict[str, float]  # axis -> what the run spent


def compare_runs(run: Curves, reference: Curves) -> Comparison:
    """The run against the reference on every axis both have."""
    axes = [axis for axis in AXES if run.get(axis) and reference.get(axis)]
    target = reference[TOKENS][-1][1]
    return Comparison(target, run[TOKENS][-1][1], {axis: amount_to_reach(run[axis], target) for axis in axes},
                      {axis: reference[axis][-1][0] for axis in axes}, {axis: run[axis][-1][0] for axis in axes})


def _amount(value: float, axis: str) -> str:
    return f"{value:,.0f} tokens" if axis == TOKENS else f"{value:.3g} FLOPs"


def comparison_sentence(comparison: Comparison, run: str, reference: str) -> str:
    """One sentence a newcomer can read: whether, and with what share of the tokens and FLOPs, the run reaches the
    reference's final loss."""
    reached = [axis for axis, amount in comparison.needed.items() if amount is not None]
    parts = []
    for axis in comparison.needed:
        amount, total = comparison.needed[axis], comparison.reference_total[axis]
        if amount is not None:
            parts.append(f"{_amount(amount, axis)} ({amount / total:.0%} of {reference}'s {_amount(total, axis)})")
    if len(reached) == len(comparison.needed):
        return (f"{run} reaches {reference}'s final validation loss {comparison.target:.4f} with "
                + " and ".join(parts) + ".")
    spent = " and ".join(_amount(comparison.run_total[axis], axis) for axis in comparison.needed)
    verdict = (f"{run} does not reach {reference}'s final validation loss {comparison.target:.4f} within its {spent} "
               f"(it ends at {comparison.final:.4f})")
    return verdict + (f"; by the other measure it does, with {parts[0]}." if parts else ".")


def plot_validation_curves(curves: Mapping[str, Curves], path: str | os.PathLike, *,
                           markers: Mapping[str, Mapping[str, float]] | None = None, title: str | None = None) -> None:
    """Write a PNG of validation loss against tokens and against FLOPs (two panels): runs named scratch* dashed,
    `markers` (label -> axis -> position) as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    axes_present = [axis for axis in AXES if any(run.get(axis) for run in curves.values())]
    figure, panels = plt.subplots(1, len(axes_present), figsize=(6.5 * len(axes_present), 4.5), squeeze=False)
    losses = [loss for run in curves.values() for _, loss in run.get(TOKENS, [])]
    for panel, axis in zip(panels[0], axes_present):
        for name, run in curves.items():
            curve = run.get(axis)
            if curve:
                panel.plot([x for x, _ in curve], [loss for _, loss in curve], label=name,
                           linestyle="--" if name.startswith("scratch") else "-",
                           marker="." if len(curve) < 30 else None)
        for label, positions in (markers or {}).items():
            if axis in positions:
                panel.axvline(positions[axis], color="grey", linewidth=0.8, linestyle=":", label=label)
        if losses:  # the first evaluations of a fresh model sit near log(vocab) and would flatten the rest
            panel.set_ylim(top=min(max(losses), min(losses) + 3.0))
        panel.set_xlabel("tokens" if axis == TOKENS else "training FLOPs (6 N per token)")
        panel.set_ylabel("validation loss")
        panel.legend()
        panel.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
