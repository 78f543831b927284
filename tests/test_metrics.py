"""Throughput/MFU arithmetic and the JSONL metrics file."""

import pytest

from megagrow.training.metrics import MetricsWriter, measure_throughput, peak_tflops, read_metrics


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") is None
    assert peak_tflops("cpu", override=1.5) == 1.5


def test_mfu_of_the_tinyllama_report():
    # TinyLlama: 24k tokens/s per A100 at ~6.6 GFLOP/token (with attention) is about 0.5 MFU.
    t = measure_throughput(tokens=24_000, seconds=1.0, flops_per_token=6.6e9, num_devices=1, device_peak_tflops=312.0)
    assert t.tflops_per_device == pytest.approx(158.4)
    assert t.mfu == pytest.approx(158.4 / 312.0)
    assert measure_throughput(10, 1.0, 1e9, 2, None).mfu is None


def test_jsonl_round_trip_skips_torn_lines(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write("train", 1, {"loss": 2.5, "lr": 1e-4})
    writer.write("valid", 1, {"loss": 2.7, "domain": "code"})
    writer.close()
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    assert [r["loss"] for r in read_metrics(path)] == [2.5, 2.7]
    assert read_metrics(path, kind="valid") == [{"kind": "valid", "step": 1, "loss": 2.7, "domain": "code"}]
