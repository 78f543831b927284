"""The BiMix data mixing law: fit it per domain on a few runs, and solve for the mixture that minimises it.

Law, per domain i, with s the training step and r_i the domain's proportion of the mixture:

    L_i(s, r_i) = (A_i / s**alpha_i + C_i) / r_i**beta_i

What the paper (Ge et al., "BiMix: A Bivariate Data Mixing Law for Language Model
Pretraining", arXiv 2405.14908) says, as far as could be checked here: the law models the
joint scaling of domain proportion and data volume, is fitted per domain with five
coefficients, extrapolates losses with a mean relative error below 0.2% and
generalises to unseen mixtures with R^2 > 0.97 (abstract of v4,
https://arxiv.org/html/2405.14908v4; the coefficient count from the summary at
https://www.sciencestack.ai/paper/2405.14908). The stored copies reachable from this
workplace hold only the opening of the paper, so its exact formula, fitting procedure and
mixture optimisation could NOT be read; the form above is the one in DESIGN.md. If the five
coefficients are a product form such as (A / r**a) * (B / s**b + C), that form has the same
four degrees of freedom as ours (A only scales B and C together), so fitting four parameters
loses nothing and keeps the fit identifiable.

What we chose:
- Fit in log space (the loss is a product of a step term and a proportion term, and relative
  error is what matters across domains of different loss levels) with
  scipy.optimize.least_squares, a soft-L1 loss so a few loss spikes do not bend the curve,
  and bounds alpha in [1e-4, 5], beta in [0, 5], A, C > 0 (fitted as logs).
- Initialisation by variable projection: on a grid of (alpha, beta), A and C follow from a
  linear least-squares fit of L * r**beta = A * s**-alpha + C; the best grid point starts the
  non-linear fit, near the optimum whatever the scale of the losses and steps.
- R^2 is reported on the losses themselves (not their logs): 1 - SS_res / SS_tot.
- Mixture: minimise sum_i w_i L_i(s*, r_i) subject to sum r = 1, r_i >= min_proportion > 0.
  With K_i = A_i / s*^alpha_i + C_i each term w_i K_i r_i**-beta_i is convex, so the optimum
  is the unique KKT point r_i = max(min_proportion, (w_i beta_i K_i / lam)**(1 / (beta_i + 1)));
  lam is found by a bracketed root search on sum r = 1 (exact, no general-purpose optimiser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import brentq, least_squares

from megagrow.errors import UserError

ALPHA_BOUNDS = (1e-4, 5.0)
BETA_BOUNDS = (0.0, 5.0)
# Variable-projection grid for the starting point; the non-linear fit refines it.
_ALPHA_GRID = np.geomspace(0.02, 2.0, 25)
_BETA_GRID = np.linspace(0.0, 1.5, 31)
# Scale of a "normal" log-space residual for the soft-L1 loss: about 1% of the loss.
_ROBUST_SCALE = 0.01


@dataclass(frozen=True)
class BiMixParams:
    """Coefficients of the law for one domain."""

    A: float
    alpha: float
    C: float
    beta: float

    def loss(self, steps, proportion) -> np.ndarray:
        """Predicted validation loss at training `steps` when the domain has `proportion` of the mixture."""
        return bimix_loss(steps, proportion, self.A, self.alpha, self.C, self.beta)


def bimix_loss(steps, proportion, A: float, alpha: float, C: float, beta: float) -> np.ndarray:
    """L(s, r) = (A / s**alpha + C) / r**beta, broadcast over `steps` and `proportion`."""
    steps = np.asarray(steps, dtype=np.float64)
    proportion = np.asarray(proportion, dtype=np.float64)
    return (A * steps ** (-alpha) + C) * proportion ** (-beta)


@dataclass(frozen=True)
class DomainFit:
    """The law fitted to one domain's observed losses, and how well it fits them."""

    domain: str
    params: BiMixParams
    r_squared: float
    points: int


def check_identifiable(domain: str, steps: np.ndarray, proportions: np.ndarray) -> None:
    """Raise a UserError when the observations cannot pin down all four coefficients of the law."""
    if proportions.size == 0:
        raise UserError(
            f"domain {domain!r} has no validation loss at a step >= --min-step in a run that trains on it; "
            f"lower --min-step or add runs"
        )
    distinct_proportions = np.unique(np.round(proportions, 12))
    if distinct_proportions.size < 2:
        raise UserError(
            f"domain {domain!r} has proportion {distinct_proportions[0]:g} in every run; fitting beta needs runs "
            f"where the domain has at least 2 different proportions: add a run with another mixture"
        )
    if np.unique(steps).size < 3:
        raise UserError(
            f"domain {domain!r} has validation losses at {np.unique(steps).size} distinct step(s); fitting "
            f"A, alpha and C needs at least 3: evaluate more often (or lower --min-step)"
        )


def _linear_step_fit(steps: np.ndarray, target: np.ndarray, alpha: float) -> tuple[float, float]:
    """A, C >= 0 minimising ||A * steps**-alpha + C - target|| (C is clipped to stay positive)."""
    design = np.stack([steps ** (-alpha), np.ones_like(steps)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, target, rcond=None)
    if a <= 0:  # no decrease with steps at this alpha: a flat curve is the best non-negative fit
        return 1e-12, max(float(target.mean()), 1e-12)
    return float(a), max(float(c), 1e-6 * float(target.mean()))


def _initial_guess(steps: np.ndarray, proportions: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Best (log A, alpha, log C, beta) on the variable-projection grid, by log-space squared error."""
    best, best_error = None, math.inf
    log_losses = np.log(losses)
    for beta in _BETA_GRID:
        target = losses * proportions**beta
        for alpha in _ALPHA_GRID:
            a, c = _linear_step_fit(steps, target, alpha)
            error = float(np.sum((np.log(bimix_loss(steps, proportions, a, alpha, c, beta)) - log_losses) ** 2))
            if error < best_error:
                best, best_error = (math.log(a), alpha, math.log(c), beta), error
    return np.asarray(best)


def fit_domain(domain: str, steps, proportions, losses) -> DomainFit:
    """Fit the law to one domain's (step, proportion, loss) observations pooled over runs."""
    steps = np.asarray(steps, dtype=np.float64)
    proportions = np.asarray(proportions, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if not (steps.shape == proportions.shape == losses.shape) or steps.ndim != 1:
        raise ValueError("steps, proportions and losses must be 1-D arrays of one length")
    if np.any(steps <= 0) or np.any(proportions <= 0) or np.any(losses <= 0):
        raise ValueError("steps, proportions and losses must be positive (the law has no value at 0)")
    check_identifiable(domain, steps, proportions)
    log_steps, log_proportions, log_losses = np.log(steps), np.log(proportions), np.log(losses)

    def residuals(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, log_c, beta = theta
        # log(A s^-alpha + C) via logaddexp: no overflow for large A or small s.
        return np.logaddexp(log_a - alpha * log_steps, log_c) - beta * log_proportions - log_losses

    start = _initial_guess(steps, proportions, losses)
    lower = [-np.inf, ALPHA_BOUNDS[0], -np.inf, BETA_BOUNDS[0]]
    upper = [np.inf, ALPHA_BOUNDS[1], np.inf, BETA_BOUNDS[1]]
    start = np.clip(start, lower, upper)
    result = least_squares(residuals, start, bounds=(lower, upper), loss="soft_l1", f_scale=_ROBUST_SCALE)
    log_a, alpha, log_c, beta = result.x
    params = BiMixParams(A=math.exp(log_a), alpha=float(alpha), C=math.exp(log_c), beta=float(beta))
    return DomainFit(domain, params, r_squared(losses, params.loss(steps, proportions)), int(losses.size))


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (1.0 for a perfect fit of constant data)."""
    residual = float(np.sum((observed - predicted) ** 2))
    total = float(np.sum((observed - observed.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else -math.inf
    return 1.0 - residual / total


def optimal_mixture(
    params: Sequence[BiMixParams],
    target_step: float,
    domain_weights: Sequence[float] | None = None,
    min_proportion: float = 1e-4,
) -> np.ndarray:
    """Proportions minimising sum_i w_i L_i(target_step, r_i) with sum r = 1 and r_i >= min_proportion."""
    n = len(params)
    if n == 0:
        raise ValueError("no domain to mix")
    if target_step <= 0:
        raise ValueError(f"target step must be positive, got {target_step}")
    if not 0 < min_proportion * n < 1:
        raise ValueError(f"min_proportion {min_proportion} leaves no room for {n} domains")
    weights = np.ones(n) if domain_weights is None else np.asarray(domain_weights, dtype=np.float64)
    if weights.shape != (n,) or np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("give one finite, non-negative weight per domain")
    betas = np.array([p.beta for p in params])
    step_terms = np.array([p.A * target_step ** (-p.alpha) + p.C for p in params])
    # Marginal value of proportion for each domain: d/dr of -w K r^-beta is w beta K r^-(beta+1).
    gains = weights * betas * step_terms
    if not np.any(gains > 0):  # no domain's loss depends on its proportion: any mixture is optimal
        return np.full(n, 1.0 / n)

    def proportions_at(log_lam: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            interior = np.exp((np.log(gains) - log_lam) / (betas + 1.0))
        return np.clip(interior, min_proportion, 1.0)

    def excess(log_lam: float) -> float:
        return float(proportions_at(log_lam).sum() - 1.0)

    # excess() falls from >= 0 to n * min_proportion - 1 < 0 as lam grows; bracket the root.
    low, high = -1.0, 1.0
    while excess(low) < 0:
        low -= 2.0 * (1.0 + abs(low))
    while excess(high) > 0:
        high += 2.0 * (1.0 + abs(high))
    log_lam = brentq(excess, low, high, xtol=1e-14, rtol=1e-14, maxiter=500)
    proportions = proportions_at(log_lam)
    return proportions / proportions.sum()  # remove the root search's last ~1e-14


def mixture_loss(params: Sequence[BiMixParams], target_step: float, proportions, domain_weights=None) -> float:
    """Weighted sum of the domains' predicted losses at `target_step` for a mixture."""
    weights = np.ones(len(params)) if domain_weights is None else np.asarray(domain_weights, dtype=np.float64)
    losses = [p.loss(target_step, r) for p, r in zip(params, proportions)]
    return float(np.dot(weights, losses))
