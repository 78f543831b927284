"""PNG of each domain's observed validation losses against the fitted BiMix curves."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from megagrow.mixing.bimix import DomainFit
from megagrow.mixing.runs import DomainObservations


def plot_fits(
    path: str | os.PathLike,
    fits: Sequence[DomainFit],
    observations: dict[str, DomainObservations],
    run_labels: Sequence[str],
    optimum: dict[str, float] | None = None,
    target_step: float | None = None,
) -> None:
    """One panel per domain: points per run, the law at each run's proportion, the optimum's curve dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    columns = min(3, len(fits))
    rows = -(-len(fits) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, fit in zip(axes.flat, fits):
        seen = observations[fit.domain]
        last_step = max(float(seen.steps.max()), float(target_step or 0))
        grid = np.geomspace(float(seen.steps.min()), last_step, 200)
        for run in np.unique(seen.run_index):
            mine = seen.run_index == run
            colour = colours(int(run) % 10)
            proportion = float(seen.proportions[mine][0])
            label = f"{run_labels[run]} (r={proportion:.3g})"
            axis.scatter(seen.steps[mine], seen.losses[mine], s=12, color=colour, label=label)
            axis.plot(grid, fit.params.loss(grid, proportion), color=colour, linewidth=1)
        if optimum is not None:
            axis.plot(grid, fit.params.loss(grid, optimum[fit.domain]), "k--", linewidth=1,
                      label=f"optimum (r={optimum[fit.domain]:.3g})")
        if target_step:
            axis.axvline(target_step, color="grey", linewidth=0.5)
        p = fit.params
        axis.set_title(f"{fit.domain}: A={p.A:.3g} α={p.alpha:.3g} C={p.C:.3g} β={p.beta:.3g}  R²={fit.r_squared:.4f}",
                       fontsize=9)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overprint
        axis.set_xlabel("step")
        axis.set_ylabel("validation loss")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(fits):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
