"""Loss-vs-tokens curves from metrics files: legs joined, thresholds interpolated, plots written."""

import pytest

from megagrow.training.loss_curves import plot_validation_curves, tokens_to_reach, validation_curve
from megagrow.training.metrics import MetricsWriter


def _write(path, points, with_tokens=True):
    writer = MetricsWriter(path)
    for step, loss in points:
        writer.write("train", step, {"loss": loss + 0.5})
        writer.write("valid", step, {"loss": loss, **({"consumed_tokens": step * 100} if with_tokens else {})})
    writer.close()
    return path


def test_legs_join_and_a_resumed_leg_replaces_the_overlap(tmp_path):
    base = _write(tmp_path / "base.jsonl", [(10, 5.0), (20, 4.0), (30, 3.8)])
    grown = _write(tmp_path / "grown.jsonl", [(30, 3.7), (40, 3.2)])  # re-evaluated at the growth point
    assert validation_curve([base, grown]) == [(1000, 5.0), (2000, 4.0), (3000, 3.7), (4000, 3.2)]


def test_old_records_need_tokens_per_iteration(tmp_path):
    old = _write(tmp_path / "old.jsonl", [(10, 5.0), (20, 4.0)], with_tokens=False)
    assert validation_curve(old, tokens_per_iteration=8) == [(80, 5.0), (160, 4.0)]
    with pytest.raises(ValueError, match="tokens_per_iteration"):
        validation_curve(old)


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tokens_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert tokens_to_reach(curve, 4.0) == pytest.approx(200.0)
    assert tokens_to_reach(curve, 6.0) == 100.0
    assert tokens_to_reach(curve, 2.0) is None


def test_plot_writes_a_png(tmp_path):
    plot = tmp_path / "curves.png"
    plot_validation_curves({"base -> grown": [(1, 5.0), (2, 4.0)], "scratch": [(1, 5.5), (2, 4.5)]}, plot,
                           markers={"growth": 1}, title="t")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
