"""Metrics files of training runs with per-domain validation losses, for the data-mixing tests."""

from megagrow.training.metrics import MetricsWriter


def write_run(path, mixture, curves, prefixes=None):
    """A metrics file as the training loop writes it: a mixture record, then per-domain validation losses."""
    writer = MetricsWriter(path)
    if mixture is not None:
        writer.write("mixture", 0, {"weights": mixture, **({"prefixes": prefixes} if prefixes else {})})
    steps = sorted({s for curve in curves.values() for s in curve})
    for step in steps:
        writer.write("train", step, {"loss": 9.9})
        writer.write("valid", step, {"loss": 3.0, "domain_losses": {d: c[step] for d, c in curves.items() if step in c}})
    writer.close()
    return str(path)
