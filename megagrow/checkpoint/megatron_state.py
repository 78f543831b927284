"""What one torch-format shard file holds: Megatron-LM's entries, and megagrow's own beside them.

    args                     Megatron-LM's Namespace (megatron_args.build_args): model, layout,
                             consumed_train_samples — what Megatron-LM reads on resume
    checkpoint_version       3.0
    iteration                the iteration the run resumes at
    model                    the stage's state dict in megatron-core's names, layers numbered
                             locally, with the local spec's `_extra_state` entries (None)
    opt_param_scheduler      Megatron's LR scheduler state (its steps count samples)
    rng_state                [{random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state,
                               rng_tracker_states}]: Megatron's RNG record
    num_floating_point_operations_so_far
    megagrow                 what Megatron-LM has no slot for: megagrow's configs, progress
                             (skipped steps), LR schedule, optimizer state (or its per-dp-rank
                             files with the distributed optimizer), growth record

megagrow's optimizer state lives under `megagrow`, not `optimizer`: its layout is not
Megatron's, and Megatron-LM finding no `optimizer` stops with its own advice (pass
--no-load-optim) instead of misreading one. A file with `model` and `args` but no progress
(a converted, exported or grown model) starts a new run.

On a CPU run the CUDA generator states Megatron-LM restores are those a fresh Megatron run
with the same seed starts from (Philox seed, offset 0): megagrow draws nothing from them.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import torch

from megagrow.checkpoint import names
from megagrow.checkpoint.megatron_args import MEGATRON_CHECKPOINT_VERSION

MEGAGROW_KEY = "megagrow"
MEGAGROW_FORMAT_VERSION = 2  # 1: the layer/attention names before megatron-core's (megagrow_v1.py)
# megatron-core's CUDA RNG tracker names and the seed offsets it derives them with.
_TRACKER_SEEDS = {"model-parallel-rng": 2718, "data-parallel-rng": 0, "expert-parallel-rng": 1024}


def with_extra_states(model_state: dict[str, Any], num_layers: int, has_output_layer: bool) -> dict[str, Any]:
    """A stage's state dict with the `_extra_state` entries megatron-core's local spec expects (None)."""
    state = dict(model_state)
    for name in names.extra_state_names(range(num_layers), has_output_layer):
        state[name] = None
    return state


def _cuda_state(seed: int) -> torch.Tensor:
    # A CUDA (Philox) generator state is its seed and offset, 8 bytes each, little endian.
    return torch.frombuffer(bytearray(struct.pack("<Qq", seed & (2**64 - 1), 0)), dtype=torch.uint8).clone()


def rng_state(seed: int, tp_rank: int, pp_rank: int) -> list[dict[str, Any]]:
    """Megatron's rng_state record of this process (one entry: no data-parallel random init)."""
    pipeline_seed = seed + 100 * pp_rank  # Megatron-LM's _set_random_seed
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    else:
        cuda = _cuda_state(pipeline_seed)
    tracker = {name: _cuda_state(pipeline_seed + offset + (tp_rank if offset else 0))
               for name, offset in _TRACKER_SEEDS.items()}
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda, "rng_tracker_states": tracker}]


def restore_rng(record: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Put back the Python, numpy, torch (and on GPU, CUDA) generators of a Megatron rng_state record."""
    state = record[0] if isinstance(record, list) else record
    random.setstate(_as_python_state(state["random_rng_state"]))
    np.random.set_state(tuple(state["np_rng_state"]))
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and torch.cuda.is_initialized() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def _as_python_state(state: Any) -> tuple:
    # random.setstate wants tuples; pickled states come back as tuples, but a list is harmless to fix.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def scheduler_state(num_steps: int, schedule: dict[str, Any]) -> dict[str, Any]:
    """Megatron's opt_param_scheduler record after `num_steps` optimizer steps of a schedule
    (LRScheduleConfig as a dict, counted in samples as Megatron-LM counts its steps)."""
    batch = schedule["global_batch_size"]
    decay = schedule["decay_samples"] if schedule["decay_samples"] is not None else schedule["warmup_samples"]
    return {"max_lr": schedule["lr"], "min_lr": schedule["min_lr"], "lr_warmup_steps": schedule["warmup_samples"],
            "lr_decay_steps": decay, "lr_decay_style": schedule["decay_style"], "num_steps": num_steps * batch,
            "start_wd": schedule["start_wd"], "end_wd": schedule["end_wd"],
            "wd_incr_style": schedule["wd_incr_style"], "wd_incr_steps": schedule["wd_incr_samples"] or 0}


def scheduler_steps(record: dict[str, Any], global_batch_size: int) -> int:
    """megagrow's optimizer steps from a Megatron opt_param_scheduler record (whose steps are samples)."""
    return int(record["num_steps"]) // global_batch_size


def shard_file(model_state: dict[str, Any], *, args, iteration: int, megagrow: dict[str, Any],
               rng: list[dict[str, Any]] | None = None, scheduler: dict[str, Any] | None = None,
               flops_so_far: float = 0.0) -> dict[str, Any]:
    """The whole content of one torch-format model_optim_rng.pt (entries as the module docstring lists)."""
    record: dict[str, Any] = {"args": args, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
                              "iteration": iteration, "model": model_state,
                              "num_floating_point_operations_so_far": flops_so_far}
    if scheduler is not None:
        record["opt_param_scheduler"] = scheduler
    if rng is not None:
        record["rng_state"] = rng
    record[MEGAGROW_KEY] = {"format_version": MEGAGROW_FORMAT_VERSION, **megagrow}
    return record
