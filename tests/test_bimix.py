"""BiMix: the law recovered from its own losses, the optimal mixture, and reading runs' metrics files."""

import json

import numpy as np
import pytest
from metrics_factory import write_run
from scipy.optimize import minimize

from megagrow.errors import UserError
from megagrow.mixing.bimix import BiMixParams, fit_domain, mixture_loss, optimal_mixture
from megagrow.mixing.runs import parse_mixture, pool_observations, read_run
from megagrow.training.metrics import MetricsWriter

TRUE = BiMixParams(A=6.0, alpha=0.45, C=1.9, beta=0.12)
STEPS = np.geomspace(50, 20_000, 25).round()
PROPORTIONS = (0.15, 0.4, 0.75)


def synthetic(params: BiMixParams, proportions=PROPORTIONS, noise=0.0, seed=0):
    """(steps, proportions, losses) of one domain over runs, losses from the law times lognormal noise."""
    steps = np.tile(STEPS, len(proportions))
    r = np.repeat(proportions, STEPS.size)
    losses = params.loss(steps, r) * np.exp(np.random.default_rng(seed).normal(0.0, noise, steps.size))
    return steps, r, losses


def assert_params_close(fitted: BiMixParams, true: BiMixParams, rel: float):
    """Every coefficient within `rel` relative error."""
    for name in ("A", "alpha", "C", "beta"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=rel), name


def test_exact_losses_recover_the_parameters():
    fit = fit_domain("code", *synthetic(TRUE))
    assert_params_close(fit.params, TRUE, rel=1e-4)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-10)
    assert fit.points == STEPS.size * len(PROPORTIONS)


@pytest.mark.parametrize("true", [
    BiMixParams(A=2.5, alpha=0.2, C=2.8, beta=0.05),
    BiMixParams(A=40.0, alpha=0.9, C=1.2, beta=0.4),
    BiMixParams(A=0.8, alpha=0.1, C=3.5, beta=0.25),
])
def test_noisy_losses_recover_the_parameters(true):
    steps, r, losses = synthetic(true, noise=0.002, seed=1)
    fit = fit_domain("prose", steps, r, losses)
    assert_params_close(fit.params, true, rel=0.15)
    assert fit.params.beta == pytest.approx(true.beta, abs=0.01)
    assert fit.r_squared > 0.99


def test_a_loss_spike_does_not_bend_the_fit():
    steps, r, losses = synthetic(TRUE)
    losses[10] *= 1.5
    assert_params_close(fit_domain("code", steps, r, losses).params, TRUE, rel=0.02)


def test_unidentifiable_observations_are_user_errors():
    steps, r, losses = synthetic(TRUE, proportions=(0.5,))
    with pytest.raises(UserError, match="proportion 0.5 in every run.*at least 2 different proportions"):
        fit_domain("code", steps, r, losses)
    with pytest.raises(UserError, match="2 distinct step"):
        fit_domain("code", [100, 200, 100, 200], [0.3, 0.3, 0.6, 0.6], [3.0, 2.9, 2.8, 2.7])
    with pytest.raises(UserError, match="no validation loss at a step >= --min-step"):
        fit_domain("code", [], [], [])


def test_optimal_mixture_matches_the_closed_form_for_equal_betas():
    params = [BiMixParams(3.0, 0.3, 2.0, 0.2), BiMixParams(1.0, 0.5, 3.0, 0.2), BiMixParams(5.0, 0.2, 1.0, 0.2)]
    step = 5000
    k = np.array([p.A * step ** -p.alpha + p.C for p in params])
    expected = k ** (1 / 1.2) / np.sum(k ** (1 / 1.2))  # r_i proportional to K_i^(1/(beta+1))
    assert optimal_mixture(params, step) == pytest.approx(expected, rel=1e-9)


def test_optimal_mixture_agrees_with_a_general_optimiser():
    rng = np.random.default_rng(2)
    for _ in range(5):
        params = [BiMixParams(rng.uniform(0.5, 10), rng.uniform(0.1, 1), rng.uniform(1, 4), rng.uniform(0.02, 0.6))
                  for _ in range(4)]
        weights = rng.uniform(0.5, 2.0, 4)
        ours = optimal_mixture(params, 10_000, weights)
        slsqp = minimize(lambda r: mixture_loss(params, 10_000, r, weights), np.full(4, 0.25), method="SLSQP",
                         bounds=[(1e-4, 1)] * 4, constraints={"type": "eq", "fun": lambda r: r.sum() - 1},
                         options={"ftol": 1e-14, "maxiter": 500})
        assert ours.sum() == pytest.approx(1.0, abs=1e-12)
        assert ours == pytest.approx(slsqp.x, abs=2e-4)
        assert mixture_loss(params, 10_000, ours, weights) <= slsqp.fun + 1e-12


def test_optimal_mixture_floors_domains_that_do_not_learn():
    params = [BiMixParams(2.0, 0.3, 2.0, 0.0), BiMixParams(2.0, 0.3, 2.0, 0.3), BiMixParams(2.0, 0.3, 2.5, 0.3)]
    r = optimal_mixture(params, 1000, min_proportion=0.01)
    assert r[0] == pytest.approx(0.01) and r.sum() == pytest.approx(1.0) and r[2] > r[1]
    flat = [BiMixParams(2.0, 0.3, 2.0, 0.0)] * 3
    assert optimal_mixture(flat, 1000) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="leaves no room"):
        optimal_mixture(params, 1000, min_proportion=0.5)


def test_recovered_law_gives_the_true_optimum():
    truths = {"code": TRUE, "prose": BiMixParams(3.0, 0.3, 2.6, 0.3)}
    fitted = [fit_domain(d, *synthetic(p, noise=0.001, seed=3)).params for d, p in truths.items()]
    assert optimal_mixture(fitted, 50_000) == pytest.approx(optimal_mixture(list(truths.values()), 50_000), abs=0.02)


# ----------------------------------------------------------------------------------------------
# metrics files


def test_read_run_round_trip(tmp_path):
    path = write_run(tmp_path / "m.jsonl", {"code": 1, "prose": 3}, {"code": {100: 2.5, 200: 2.2}, "prose": {100: 3.1, 200: 3.0}},
                     prefixes={"code": "data/code"})
    with open(path, "a") as f:  # a resumed run evaluates step 200 again; the later value wins
        f.write(json.dumps({"kind": "valid", "step": 200, "domain_losses": {"code": 2.1, "prose": 2.9}}) + "\n")
    run = read_run(path)
    assert run.mixture == {"code": 0.25, "prose": 0.75}
    assert run.prefixes == {"code": "data/code"}
    assert run.steps["code"].tolist() == [100, 200] and run.losses["code"].tolist() == [2.5, 2.1]
    assert read_run(path, mixture=parse_mixture("code=1,prose=1")).mixture == {"code": 0.5, "prose": 0.5}


def test_read_run_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="metrics file not found"):
        read_run(tmp_path / "missing.jsonl")
    no_domains = tmp_path / "plain.jsonl"
    MetricsWriter(no_domains).write("valid", 10, {"loss": 3.0})
    with pytest.raises(UserError, match="no per-domain validation losses"):
        read_run(no_domains, mixture={"code": 1.0})
    with pytest.raises(UserError, match="no .*mixture.* record; pass this run's weights with --mixtures"):
        read_run(write_run(tmp_path / "nomix.jsonl", None, {"code": {10: 3.0}}))
    with pytest.raises(UserError, match="have losses but no weight"):
        read_run(write_run(tmp_path / "partial.jsonl", {"code": 1.0}, {"code": {10: 3.0}, "math": {10: 4.0}}))
    changing = write_run(tmp_path / "changes.jsonl", {"code": 0.5, "prose": 0.5}, {"code": {10: 3.0}})
    MetricsWriter(changing).write("mixture", 20, {"weights": {"code": 0.9, "prose": 0.1}})
    with pytest.raises(UserError, match="mixture changes within the run"):
        read_run(changing)
    with pytest.raises(UserError, match="step 10: loss -1.0 of domain 'code' is not a positive number"):
        read_run(write_run(tmp_path / "negative.jsonl", {"code": 1.0}, {"code": {10: -1.0}}))
    for bad in ("code", "code=x", "code=-1", "=0.5", "code=0"):
        with pytest.raises(UserError):
            parse_mixture(bad)


def test_pool_observations(tmp_path):
    curves = {"code": {0: 9.0, 100: 2.5, 200: 2.2}, "prose": {0: 9.0, 100: 3.1, 200: 3.0}}
    a = read_run(write_run(tmp_path / "a.jsonl", {"code": 0.5, "prose": 0.5}, curves))
    b = read_run(write_run(tmp_path / "b.jsonl", {"code": 1.0, "prose": 0.0}, curves))
    pooled = pool_observations([a, b], min_step=1)
    assert pooled["code"].steps.tolist() == [100, 200, 100, 200]  # step 0 (initialisation) is off the law
    assert pooled["code"].proportions.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert pooled["code"].run_index.tolist() == [0, 0, 1, 1]
    assert pooled["prose"].run_index.tolist() == [0, 0]  # an untrained domain has no point on the law
    c = read_run(write_run(tmp_path / "c.jsonl", {"code": 0.5, "math": 0.5}, {"code": {100: 2.0}, "math": {100: 4.0}}))
    with pytest.raises(UserError, match="mismatched domain names"):
        pool_observations([a, c])
