"""Training metrics: throughput/MFU arithmetic and the JSONL (+ TensorBoard) metrics sink.

The JSONL file is the record later tools read (the BiMix fit, growth plots), so it is
always written; TensorBoard is an optional mirror when installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("megagrow.training")

# Dense (non-sparse) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
# Matched as substrings of torch.cuda.get_device_name(); order matters (PCIe before plain H100).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("V100", 125.0),
)


def peak_memory_gb(device: torch.device | None = None) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the resident set's on CPU."""
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s of one device (the flag wins); None when unknown (MFU is then not reported)."""
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


@dataclass
class Throughput:
    """Speed of one logging window."""

    tokens_per_second: float
    tflops_per_device: float
    mfu: float | None  # fraction of peak, None when the peak is unknown


def measure_throughput(
    tokens: int, seconds: float, flops_per_token: float, num_devices: int, device_peak_tflops: float | None
) -> Throughput:
    """Tokens/s over all devices, achieved TFLOP/s per device and model FLOPs utilisation."""
    tokens_per_second = tokens / seconds if seconds > 0 else math.inf
    tflops = tokens_per_second * flops_per_token / num_devices / 1e12
    mfu = tflops / device_peak_tflops if device_peak_tflops else None
    return Throughput(tokens_per_second, tflops, mfu)


class MetricsWriter:
    """Appends one JSON object per event to a JSONL file and mirrors scalars to TensorBoard."""

    def __init__(self, jsonl_path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None,
                 append: bool = True):
        self.path = Path(jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a crash loses at most one line. A resumed run appends to its
        # history; a fresh run starts a new file so curves of two runs never interleave.
        self._file = open(self.path, "a" if append else "w", buffering=1)
        self._tensorboard = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                logger.warning("--tensorboard-dir given but tensorboard is not installed; writing JSONL only")

    def write(self, kind: str, step: int, values: dict) -> None:
        """Record `values` (numbers or strings) for `step` under an event kind ('train', 'valid', ...)."""
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        """Flush and close the sinks."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(jsonl_path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of a metrics file (optionally of one kind); unreadable lines (a torn last write) are skipped."""
    records = []
    with open(jsonl_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records
