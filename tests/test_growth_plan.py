"""The G_stack timing law against the authors' published table, the budget split, and tools/growth_plan.py."""

import pytest
from fixtures_text import load_tool, run_tool

from megagrow.config import model_preset, num_parameters
from megagrow.errors import UserError
from megagrow.growth.guidelines import (
    GrowthTimingLaw,
    base_config,
    format_count,
    plan_growth,
    recommend_growth_factor,
    training_compute,
)

growth_plan = load_tool("growth_plan")


# (target parameters N, run tokens D, growth timing d) from the table in the authors' repository
# README (github.com/tongxuluo/prts), printed to two decimals in billions.
PUBLISHED = [(8e9, 15e12, 6.58e9), (7e9, 2e12, 11.11e9), (13e9, 2e12, 15.84e9), (70e9, 2e12, 42.48e9)]


@pytest.mark.parametrize("params, tokens, timing", PUBLISHED)
def test_law_reproduces_the_published_table(params, tokens, timing):
    d = GrowthTimingLaw().growth_tokens(params, training_compute(params, tokens))
    assert round(d / 1e9, 2) == pytest.approx(timing / 1e9, abs=0.006)


def test_law_constants_can_be_overridden():
    law = GrowthTimingLaw(a=1.0, b=0.0, c=-3.0)
    assert law.growth_tokens(7e9, 1e23) == pytest.approx(7e6)
    assert not law.is_paper and GrowthTimingLaw().is_paper
    assert "- 5.74" in GrowthTimingLaw().describe()
    with pytest.raises(UserError, match="compute"):
        GrowthTimingLaw().growth_tokens(7e9, 1.0)


@pytest.mark.parametrize("layers, factor", [(None, 4), (32, 4), (22, 2), (30, 3), (24, 4), (35, 5)])
def test_recommended_factor(layers, factor):
    assert recommend_growth_factor(layers) == factor


def test_no_factor_for_prime_depths():
    with pytest.raises(UserError, match="divisible by 4"):
        recommend_growth_factor(23)


def test_plan_splits_the_compute_between_base_and_grown_model():
    target = model_preset("llama2-7b")
    compute = training_compute(num_parameters(target), 2e12)
    plan = plan_growth(compute, target_config=target)
    assert plan.growth_factor == 4
    assert plan.base_config == target.replace(num_layers=8)
    assert plan.base_params == num_parameters(plan.base_config)
    assert plan.base_flops + plan.grown_flops == pytest.approx(compute)
    assert plan.scratch_tokens == pytest.approx(2e12)
    assert plan.growth_tokens == pytest.approx(GrowthTimingLaw().growth_tokens(plan.target_params, compute))
    assert 10e9 < plan.growth_tokens < 12e9  # the paper's "about 10B tokens" for 7B targets


def test_plan_errors():
    with pytest.raises(UserError, match="not divisible by growth factor 4"):
        base_config(model_preset("tinyllama-1.1b"), 4)
    with pytest.raises(UserError, match="raise --compute"):
        plan_growth(1e19, target_params=1e9)
    with pytest.raises(UserError, match="--target-params"):
        plan_growth(1e22)


def run_main(capsys, *argv):
    """The tool's main in-process; returns (plan, stdout)."""
    plan = growth_plan.main([str(a) for a in argv])
    return plan, capsys.readouterr().out


def test_tool_prints_the_plan(capsys):
    plan, out = run_main(capsys, "--target-params", "7B", "--tokens", "2T")
    assert format_count(plan.growth_tokens) == "11.11B"
    assert "Train the base model for 11.11B tokens, stack it 4 times" in out
    assert "(as published)" in out and "approximate" in out
    same, _ = run_main(capsys, "--target-params", "7e9", "--compute", f"{6 * 7e9 * 2e12:.6e}")
    assert same.growth_tokens == pytest.approx(plan.growth_tokens)


def test_tool_with_a_preset(capsys):
    plan, out = run_main(capsys, "--model-preset", "tinyllama-1.1b", "--tokens", "300B", "--law-b", "160")
    assert plan.growth_factor == 2 and plan.base_config.num_layers == 11
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    assert rows["base, from scratch"][3:5] == ["11", "2048"]
    assert "overridden" in out and "the paper recommends 4" in out
    assert "extrapolation" not in out
    _, out = run_main(capsys, "--model-preset", "small-cpu", "--tokens", "5B")
    assert "extrapolation" in out


@pytest.mark.parametrize("argv, message", [
    (["--model-preset", "tinyllama-1.1b", "--tokens", "300B", "--growth-factor", "4"], "--growth-factor 2"),
    (["--target-params", "7B", "--tokens", "1M"], "raise --compute"),
    (["--target-params", "seven", "--tokens", "2T"], "--target-params 'seven' is not a number"),
    (["--target-params", "0", "--tokens", "2T"], "must be positive"),
])
def test_tool_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        growth_plan.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_tool_needs_a_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        growth_plan.main(["--tokens", "2T"])
    assert exit_info.value.code == 2
    assert "--target-params N or --model-preset P" in capsys.readouterr().err


def test_tool_runs_as_a_script():
    result = run_tool("growth_plan", "--target-params", "7B", "--tokens", "2T")
    assert result.returncode == 0 and "11.11B" in result.stdout
