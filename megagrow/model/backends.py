"""Choice between fused GPU kernels (flash-attn 2, apex RMSNorm) and their torch fallbacks.

A fused kernel is used only when its package imports AND the activations are on CUDA
(flash-attn also needs them in fp16/bf16). Modules ask at every call with the tensors they
hold, so a model built on the CPU and moved with .cuda() still gets the fused kernels. Each
decision is made once per (kernel, device type, dtype, forced), leaving out what cannot
change it, and logged once on the "megagrow.model" logger. Force the torch path with
`force_torch=True` (LlamaModel's `force_torch_kernels`) or the environment variable
MEGAGROW_FORCE_TORCH_KERNELS=1, to debug a numerical difference or to test the fallback on
a GPU machine. MEGAGROW_DISABLE_FUSED=attention,rmsnorm,adamw (any subset) turns off single
fused kernels, so a benchmark can show what each one contributes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger("megagrow.model")

FORCE_TORCH_KERNELS_ENV = "MEGAGROW_FORCE_TORCH_KERNELS"
DISABLE_FUSED_ENV = "MEGAGROW_DISABLE_FUSED"

FLASH_ATTENTION = "flash-attn"
SDPA = "torch-sdpa"
APEX_RMSNORM = "apex-fused-rmsnorm"
TORCH_RMSNORM = "torch-rmsnorm"

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _importable(module: str) -> bool:
    # A broken install (e.g. flash-attn built for another CUDA) raises something other than
    # ImportError; either way the kernel is unusable and the fallback is the right answer.
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return False
    return True


def _forced(force_torch: bool | None) -> bool:
    if force_torch is not None:
        return force_torch
    return os.environ.get(FORCE_TORCH_KERNELS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fused_disabled(kind: str) -> bool:
    """True when MEGAGROW_DISABLE_FUSED (comma-separated: attention, rmsnorm, adamw) names `kind`."""
    return kind in {name.strip().lower() for name in os.environ.get(DISABLE_FUSED_ENV, "").split(",")}


def _choose(kind: str, device_type: str, dtype: torch.dtype | None, forced: bool) -> tuple[str, str]:
    """(backend, why) for one kernel kind; pure, so its answer can be cached."""
    if kind == "attention":
        fused, fallback, module = FLASH_ATTENTION, SDPA, "flash_attn"
    else:
        fused, fallback, module = APEX_RMSNORM, TORCH_RMSNORM, "apex.normalization"
    if forced:
        return fallback, f"forced by argument, {FORCE_TORCH_KERNELS_ENV} or {DISABLE_FUSED_ENV}"
    if device_type != "cuda":
        return fallback, f"device is {device_type}, not cuda"
    if kind == "attention" and dtype not in _HALF_DTYPES:
        return fallback, f"flash-attn needs fp16/bf16, params are {dtype}"
    if not _importable(module):
        return fallback, f"{module} is not importable"
    return fused, f"{module} importable on cuda"


# (kind, device type, dtype, forced) -> backend. A plain dict, not functools.lru_cache: torch.compile
# reads a dict lookup as a constant (guarded), where it would trace into a cached function.
_CHOICES: dict[tuple, str] = {}


def _decide(kind: str, device: torch.device | str | None, dtype: torch.dtype | None, force_torch: bool | None) -> str:
    # Inputs that cannot change the outcome are dropped, so a forced or CPU choice is made
    # (and logged) once however many devices and dtypes ask.
    forced = _forced(force_torch) or fused_disabled(kind)
    device_type = torch.device(device or "cpu").type
    if forced:
        device_type, dtype = "any", None
    elif device_type != "cuda":
        dtype = None
    key = (kind, device_type, dtype, forced)
    if key not in _CHOICES:
        choice, reason = _choose(*key)
        log_choice(f"{kind} backend", choice, reason)
        _CHOICES[key] = choice
    return _CHOICES[key]


def attention_backend(device: torch.device | str | None, dtype: torch.dtype,
                      force_torch: bool | None = None) -> str:
    """FLASH_ATTENTION or SDPA for attention on `device` with params of `dtype`."""
    return _decide("attention", device, dtype, force_torch)


def norm_backend(device: torch.device | str | None, force_torch: bool | None = None) -> str:
    """APEX_RMSNORM or TORCH_RMSNORM for RMSNorm on `device`."""
    return _decide("rmsnorm", device, None, force_torch)


@functools.lru_cache(maxsize=None)
def _log_once(kind: str, choice: str, reason: str) -> None:
    logger.info("%s: %s (%s)", kind, choice, reason)


def log_choice(kind: str, choice: str, reason: str) -> None:
    """Log a speed option's setting on the "megagrow.model" logger, once per distinct (kind, choice, reason)."""
    if torch.compiler.is_compiling():  # a logger call would break the graph; eager calls log it
        return
    _log_once(kind, choice, reason)


def reset_backend_choices() -> None:
    """Forget the cached choices so the next model decides (and logs) again; for tests."""
    _CHOICES.clear()
    _log_once.cache_clear()
