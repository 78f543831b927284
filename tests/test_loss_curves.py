"""Loss against tokens and against training FLOPs from metrics files: legs joined, thresholds interpolated,
comparisons stated, plots written."""

import pytest

from megagrow.training.loss_curves import (
    FLOPS,
    TOKENS,
    amount_to_reach,
    compare_runs,
    comparison_sentence,
    plot_validation_curves,
    run_curves,
    validation_curve,
)
from megagrow.training.metrics import MetricsWriter


def _write(path, points, with_tokens=True, flops_per_token=None):
    writer = MetricsWriter(path)
    for step, loss, *flops in points:
        writer.write("train", step, {"loss": loss + 0.5})
        values = {"loss": loss, **({"consumed_tokens": step * 100} if with_tokens else {})}
        if flops_per_token is not None:
            values["consumed_flops"] = flops[0] if flops else step * 100 * flops_per_token
        writer.write("valid", step, values)
    writer.close()
    return path


def test_legs_join_and_a_resumed_leg_replaces_the_overlap(tmp_path):
    base = _write(tmp_path / "base.jsonl", [(10, 5.0), (20, 4.0), (30, 3.8)])
    grown = _write(tmp_path / "grown.jsonl", [(30, 3.7), (40, 3.2)])  # re-evaluated at the growth point
    assert validation_curve([base, grown]) == [(1000, 5.0), (2000, 4.0), (3000, 3.7), (4000, 3.2)]


def test_old_records_need_tokens_per_iteration_and_have_no_flops(tmp_path):
    old = _write(tmp_path / "old.jsonl", [(10, 5.0), (20, 4.0)], with_tokens=False)
    assert validation_curve(old, tokens_per_iteration=8) == [(80, 5.0), (160, 4.0)]
    with pytest.raises(ValueError, match="tokens_per_iteration"):
        validation_curve(old)
    with pytest.raises(ValueError, match="consumed_flops"):
        validation_curve(old, axis=FLOPS)


def test_amount_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert amount_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert amount_to_reach(curve, 4.0) == pytest.approx(200.0)
    assert amount_to_reach(curve, 6.0) == 100.0
    assert amount_to_reach(curve, 2.0) is None


def test_a_grown_run_is_compared_at_equal_tokens_and_at_equal_flops(tmp_path):
    # The base's tokens cost 1 FLOP each, the grown model's 2: the grown run needs more tokens than scratch
    # to reach scratch's final loss, but fewer FLOPs.
    base = _write(tmp_path / "base.jsonl", [(10, 5.0, 1000), (20, 4.5, 2000)], flops_per_token=1)
    grown = _write(tmp_path / "grown.jsonl", [(30, 4.0, 4000), (40, 3.0, 6000)], flops_per_token=2)
    scratch = _write(tmp_path / "scratch.jsonl", [(10, 4.8), (20, 4.2), (30, 3.4)], flops_per_token=2)
    comparison = compare_runs(run_curves([base, grown]), run_curves(scratch))
    assert comparison.target == 3.4
    assert comparison.needed[TOKENS] == pytest.approx(3600.0) and comparison.needed[FLOPS] == pytest.approx(5200.0)
    sentence = comparison_sentence(comparison, "base -> grown", "scratch")
    assert sentence == ("base -> grown reaches scratch's final validation loss 3.4000 with 3,600 tokens (120% of "
                        "scratch's 3,000 tokens) and 5.2e+03 FLOPs (87% of scratch's 6e+03 FLOPs).")
    short = compare_runs(run_curves(base), run_curves(scratch))
    assert comparison_sentence(short, "base", "scratch") == (
        "base does not reach scratch's final validation loss 3.4000 within its 2,000 tokens and 2e+03 FLOPs "
        "(it ends at 4.5000).")


def test_plot_writes_two_panels(tmp_path):
    plot = tmp_path / "curves.png"
    curves = {"base -> grown": {TOKENS: [(1, 5.0), (2, 4.0)], FLOPS: [(1, 5.0), (3, 4.0)]},
              "scratch": {TOKENS: [(1, 5.5), (2, 4.5)], FLOPS: [(2, 5.5), (4, 4.5)]}}
    plot_validation_curves(curves, plot, markers={"growth": {TOKENS: 1, FLOPS: 1}}, title="t")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(plot).size
    assert width > 1.8 * height  # side by side: tokens, then FLOPs
