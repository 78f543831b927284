"""Weight-decay grouping and backend choice of the AdamW builder."""

import logging

import torch

from megagrow.training.optimizer import OptimizerConfig, build_adamw, select_adamw_backend, weight_decay_groups


def test_matrices_decay_biases_and_gains_do_not():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = weight_decay_groups(model.parameters(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}
    assert len(groups[1]["params"]) == 3


def test_cpu_falls_back_to_torch_adamw_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr("megagrow.training.optimizer._logged_backends", set())
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    assert select_adamw_backend(params) == "torch"
    with caplog.at_level(logging.INFO, logger="megagrow.training"):
        opt = build_adamw(params, OptimizerConfig(lr=1e-3, weight_decay=0.0))
        build_adamw(params, OptimizerConfig(lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert sum("AdamW backend: torch" in r.message for r in caplog.records) == 1


def test_adamw_step_matches_reference_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 2))
    start = p.detach().clone()
    opt = build_adamw([p], OptimizerConfig(lr=0.1, weight_decay=0.5, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8))
    p.grad = torch.full_like(p, 2.0)
    opt.step()
    # First Adam step: the bias-corrected update is g / (|g| + eps) = 1; decay is lr * wd * p.
    expected = start * (1 - 0.1 * 0.5) - 0.1 * 1.0
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


def test_fused_backends_chosen_on_cuda(monkeypatch):
    # Only .is_cuda is read, so stand-ins let the CUDA rule be checked on a CPU machine.
    import sys
    import types

    cuda_params = [types.SimpleNamespace(is_cuda=True)]
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", types.ModuleType("apex.optimizers"))
    assert select_adamw_backend(cuda_params) == "apex"
    assert select_adamw_backend(cuda_params, prefer_fused=False) == "torch"
    monkeypatch.setenv("MEGAGROW_DISABLE_FUSED", "rmsnorm, adamw")
    assert select_adamw_backend(cuda_params) == "torch"
    monkeypatch.delenv("MEGAGROW_DISABLE_FUSED")
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)  # None in sys.modules: the import fails
    assert select_adamw_backend(cuda_params) == "torch-fused"
