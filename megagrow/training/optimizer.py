"""AdamW with Megatron's weight-decay grouping, on the fastest implementation available.

Backends, in order of preference: apex FusedAdam (CUDA, apex importable), torch's fused
AdamW (CUDA), torch's foreach AdamW (CPU and everything else). The choice is logged once.
MEGAGROW_DISABLE_FUSED=adamw (megagrow.model.backends) keeps the foreach one on CUDA too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megagrow.checkpoint.optimizer_layout import uses_weight_decay
from megagrow.model.backends import fused_disabled

logger = logging.getLogger("megagrow.training")
_logged_backends: set[str] = set()


@dataclass
class OptimizerConfig:
    """AdamW settings, named after Megatron's flags."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8


def weight_decay_groups(params, weight_decay: float, decays: dict[int, bool] | None = None) -> list[dict]:
    """Split parameters into decayed and non-decayed groups (`decays` maps id(param) to a decision)."""
    decay, no_decay = [], []
    for param in params:
        if not param.requires_grad:
            continue
        decided = decays.get(id(param)) if decays is not None else None
        (decay if (uses_weight_decay(param) if decided is None else decided) else no_decay).append(param)
    groups = []
    # wd_mult: the share of a scheduled weight decay each group takes (megatron-core's key).
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0})
    return groups


def select_adamw_backend(params, prefer_fused: bool = True) -> str:
    """Name of the AdamW implementation to use for these parameters: 'apex', 'torch-fused' or 'torch'."""
    on_cuda = all(p.is_cuda for p in params) and len(params) > 0
    if prefer_fused and on_cuda and not fused_disabled("adamw"):
        try:
            import apex.optimizers  # noqa: F401

            return "apex"
        except ImportError:
            return "torch-fused"
    return "torch"


def build_adamw(
    params, config: OptimizerConfig, prefer_fused: bool = True, decays: dict[int, bool] | None = None
) -> torch.optim.Optimizer:
    """AdamW over `params` with weight-decay groups and the best available backend."""
    params = [p for p in params if p.requires_grad]
    groups = weight_decay_groups(params, config.weight_decay, decays)
    betas = (config.adam_beta1, config.adam_beta2)
    backend = select_adamw_backend(params, prefer_fused)
    if backend not in _logged_backends:
        logger.info("AdamW backend: %s", backend)
        _logged_backends.add(backend)
    if backend == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=config.lr, betas=betas, eps=config.adam_eps, adam_w_mode=True)
    if backend == "torch-fused":
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.adam_eps, fused=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.adam_eps, foreach=True)
