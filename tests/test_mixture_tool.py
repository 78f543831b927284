"""tools/mixture.py end to end: entropy and fit on small generated data, their --data-path lines and errors."""

import math

import numpy as np
import pytest
from data_factory import random_documents, write_dataset
from fixtures_text import load_tool, run_tool
from metrics_factory import write_run

from megagrow.data.blended_dataset import parse_data_path
from megagrow.mixing.bimix import BiMixParams, optimal_mixture

mixture = load_tool("mixture")

LAWS = {"code": BiMixParams(A=6.0, alpha=0.45, C=1.9, beta=0.12), "prose": BiMixParams(A=3.0, alpha=0.3, C=2.6, beta=0.3)}
RUN_MIXTURES = ({"code": 0.2, "prose": 0.8}, {"code": 0.5, "prose": 0.5}, {"code": 0.8, "prose": 0.2})
EVAL_STEPS = [100, 200, 400, 800, 1600, 3200, 6400]


def data_path_line(stdout: str) -> list[str]:
    """The items after --data-path on the tool's last output line."""
    last = stdout.strip().splitlines()[-1].split()
    assert last[0] == "--data-path"
    return last[1:]


def run_main(capsys, *argv):
    """main(argv) in-process; returns (result, stdout)."""
    result = mixture.main([str(a) for a in argv])
    return result, capsys.readouterr().out


def expect_user_error(capsys, *argv) -> str:
    """main(argv) must exit with status 2 and end stderr with its only 'error:' line (after progress); returns it."""
    with pytest.raises(SystemExit) as exit_info:
        mixture.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, lines
    return lines[-1]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two datasets of different entropy: 200 token ids versus 4."""
    root = tmp_path_factory.mktemp("domains")
    return {
        "code": write_dataset(root / "code", random_documents(seed=1, num_documents=80, max_length=60, vocab_size=200)),
        "prose": write_dataset(root / "prose", random_documents(seed=2, num_documents=80, max_length=60, vocab_size=4)),
    }


def test_entropy_prints_a_data_path_that_parses(domains, capsys):
    prefixes = [domains["code"], domains["prose"]]
    result, out = run_main(capsys, "entropy", "--data-path", *prefixes, "--max-tokens", 1500)
    assert "H(X'|X)" in out
    components = parse_data_path(data_path_line(out))
    assert [c.prefix for c in components] == prefixes
    assert sum(float(w) for w in data_path_line(out)[::2]) == pytest.approx(1.0, abs=1e-12)
    conditional = [e.conditional_nats for e in result.estimates]
    assert [c.weight for c in components] == pytest.approx(np.array(conditional) / sum(conditional), abs=1e-6)
    assert conditional[0] > conditional[1] > 0
    assert all(e.tokens == 1500 for e in result.estimates)


def test_entropy_mix_file_gives_the_printed_mixture(domains, tmp_path, capsys):
    prefixes = [domains["code"], domains["prose"]]
    mix = tmp_path / "mix" / "entropy.txt"
    mix.parent.mkdir()
    _, out = run_main(capsys, "entropy", "--data-path", *prefixes, "--max-tokens", 1500, "--mix-file", mix)
    from_file = parse_data_path([f"@{mix}"])
    printed = parse_data_path(data_path_line(out))
    assert [(c.weight, c.prefix) for c in from_file] == [(c.weight, c.prefix) for c in printed]
    assert mix.read_text().startswith("# mixture.py entropy")


def test_entropy_options_change_the_weights(domains, capsys):
    prefixes = [domains["code"], domains["prose"]]
    joint, _ = run_main(capsys, "entropy", "--data-path", *prefixes, "--max-tokens", 1500, "--proxy", "joint")
    soft, _ = run_main(capsys, "entropy", "--data-path", *prefixes, "--max-tokens", 1500, "--mapping", "softmax")
    h = [e.joint_nats for e in joint.estimates]
    assert joint.weights == pytest.approx(np.array(h) / sum(h))
    c = np.array([e.conditional_nats for e in soft.estimates])
    assert soft.weights == pytest.approx(np.exp(c) / np.exp(c).sum())


def test_entropy_errors(domains, tmp_path, capsys):
    assert "dataset file not found" in expect_user_error(capsys, "entropy", "--data-path", domains["code"], tmp_path / "nope")
    single = write_dataset(tmp_path / "single", [[1], [2], [3]])
    assert "no document of two or more tokens" in expect_user_error(capsys, "entropy", "--data-path", single)


@pytest.fixture(scope="module")
def runs(domains, tmp_path_factory):
    """Three runs' metrics files whose per-domain losses follow LAWS exactly."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for i, weights in enumerate(RUN_MIXTURES):
        curves = {d: {s: float(LAWS[d].loss(s, weights[d])) for s in EVAL_STEPS} for d in LAWS}
        curves["code"][0] = curves["prose"][0] = 10.4  # the loss at initialisation, off the law
        paths.append(write_run(root / f"run{i}" / "metrics.jsonl", weights, curves, prefixes=domains))
    return paths


def test_fit_recovers_the_law_and_prints_the_optimum(runs, domains, tmp_path, capsys):
    plot = tmp_path / "fit.png"
    result, out = run_main(capsys, "fit", "--runs", *runs, "--target-step", 20_000, "--plot", plot)
    for fit in result.fits:
        true = LAWS[fit.domain]
        assert (fit.params.A, fit.params.alpha, fit.params.C, fit.params.beta) == pytest.approx(
            (true.A, true.alpha, true.C, true.beta), rel=1e-3)
        assert fit.r_squared == pytest.approx(1.0, abs=1e-9)
    expected = optimal_mixture(list(LAWS.values()), 20_000)
    assert [result.optimum[d] for d in LAWS] == pytest.approx(expected, abs=1e-4)
    items = data_path_line(out)
    components = parse_data_path(items)
    assert [c.prefix for c in components] == [domains["code"], domains["prose"]]
    assert sum(float(w) for w in items[::2]) == pytest.approx(1.0, abs=1e-12)
    assert "R^2" in out and "weighted sum" in out
    run_main(capsys, "fit", "--runs", *runs, "--target-step", 20_000, "--mix-file", tmp_path / "fit.txt")
    from_file = parse_data_path([f"@{tmp_path / 'fit.txt'}"])
    assert [(c.weight, c.prefix) for c in from_file] == [(c.weight, c.prefix) for c in components]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_takes_mixtures_from_the_command_line(runs, tmp_path, capsys):
    bare = []
    for i, weights in enumerate(RUN_MIXTURES):  # the same losses, without mixture records
        curves = {d: {s: float(LAWS[d].loss(s, weights[d])) for s in EVAL_STEPS} for d in LAWS}
        bare.append(write_run(tmp_path / f"bare{i}.jsonl", None, curves))
    flags = [",".join(f"{d}={w}" for d, w in m.items()) for m in RUN_MIXTURES]
    result, out = run_main(capsys, "fit", "--runs", *bare, "--mixtures", *flags, "--domain-weights", "code=2,prose=1")
    assert result.target_step == EVAL_STEPS[-1]
    expected = optimal_mixture(list(LAWS.values()), EVAL_STEPS[-1], [2.0, 1.0])
    assert [result.optimum[d] for d in LAWS] == pytest.approx(expected, abs=1e-4)
    assert data_path_line(out)[1::2] == ["code", "prose"]  # no prefixes known: the domain names stand in
    assert math.fsum(float(w) for w in data_path_line(out)[::2]) == pytest.approx(1.0, abs=1e-12)


def test_fit_errors(runs, tmp_path, capsys):
    assert "at least 2 runs" in expect_user_error(capsys, "fit", "--runs", runs[0])
    assert "metrics file not found" in expect_user_error(capsys, "fit", "--runs", runs[0], tmp_path / "none.jsonl")
    other = write_run(tmp_path / "other.jsonl", {"code": 0.5, "math": 0.5}, {"code": {100: 3.0}, "math": {100: 4.0}})
    assert "mismatched domain names" in expect_user_error(capsys, "fit", "--runs", runs[0], other)
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"kind": "valid", "step": 100, "loss": 3.0}\n{"kind": "mixture", "step": 0, "weights": {"code": 1}}\n')
    assert "no per-domain validation losses" in expect_user_error(capsys, "fit", "--runs", runs[0], plain)
    same = [runs[1], runs[1]]
    assert "at least 2 different proportions" in expect_user_error(capsys, "fit", "--runs", *same)
    assert "--mixtures: 1 mixtures for 2 runs" in expect_user_error(capsys, "fit", "--runs", *runs[:2], "--mixtures", "code=1")


def test_command_line_exit_status(domains):
    ok = run_tool("mixture", "entropy", "--data-path", domains["code"], "--max-tokens", 500)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith("--data-path 1.000000 ")
    missing = run_tool("mixture", "entropy", "--data-path", "no/such/prefix")
    assert missing.returncode == 2 and missing.stderr.startswith("error: dataset file not found: no/such/prefix.idx")
