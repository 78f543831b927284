"""fp32 master weights, gradient buffers, clipping and skipped steps (single process)."""

import copy
import math

import torch

from megagrow.parallel.data_parallel import DataParallelGradReducer
from megagrow.training.loss_scaler import DynamicLossScaler, LossScalerConfig
from megagrow.training.mixed_precision import MixedPrecisionOptimizer
from megagrow.training.optimizer import OptimizerConfig


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).to(dtype)


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def _train_megagrow(model, steps, micro_batches, clip, dtype=torch.float32, scaler=None):
    reducer = DataParallelGradReducer(model.parameters(), bucket_size=100)  # several buckets
    opt = MixedPrecisionOptimizer(reducer, OptimizerConfig(lr=1e-2, weight_decay=0.1), clip_grad=clip, loss_scaler=scaler)
    results = []
    data = _batches(steps * micro_batches)
    for step in range(steps):
        opt.zero_grad()
        reducer.start_step(micro_batches)
        for x, y in data[step * micro_batches : (step + 1) * micro_batches]:
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y) / micro_batches
            (loss * opt.loss_scale).backward()
        reducer.finish()
        results.append(opt.step())
    return results


def _train_reference(model, steps, micro_batches, clip):
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
    )
    norms = []
    data = _batches(steps * micro_batches)
    for step in range(steps):
        opt.zero_grad()
        for x, y in data[step * micro_batches : (step + 1) * micro_batches]:
            (torch.nn.functional.mse_loss(model(x), y) / micro_batches).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
    return norms


def test_fp32_matches_torch_adamw_with_clipping_and_accumulation():
    model = _model()
    reference = copy.deepcopy(model)
    results = _train_megagrow(model, steps=4, micro_batches=3, clip=0.05)
    norms = _train_reference(reference, steps=4, micro_batches=3, clip=0.05)
    assert [r.skipped for r in results] == [False] * 4
    for r, n in zip(results, norms):
        assert math.isclose(r.grad_norm, n, rel_tol=1e-5)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_model_keeps_fp32_masters():
    model = _model(torch.bfloat16)
    reducer = DataParallelGradReducer(model.parameters())
    opt = MixedPrecisionOptimizer(reducer, OptimizerConfig(lr=1e-3), clip_grad=1.0)
    assert all(f.master.dtype == torch.float32 and f.master is not f.param for f in opt.fragments)
    assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
    before = [f.master.detach().clone() for f in opt.fragments]
    reducer.start_step(1)
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
    reducer.finish()
    assert not opt.step().skipped
    moved = [not torch.equal(b, f.master) for b, f in zip(before, opt.fragments)]
    assert all(moved)
    for f in opt.fragments:
        assert torch.equal(f.param.detach(), f.master.detach().bfloat16())


def test_non_finite_gradients_skip_the_step_and_back_off_the_fp16_scale():
    model = _model()
    scaler = DynamicLossScaler(LossScalerConfig(initial_scale=1024.0, hysteresis=1))
    reducer = DataParallelGradReducer(model.parameters())
    opt = MixedPrecisionOptimizer(reducer, OptimizerConfig(lr=1e-3), loss_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    reducer.start_step(1)
    model(torch.full((2, 8), float("inf"))).sum().backward()
    reducer.finish()
    result = opt.step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert scaler.scale == 512.0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _step(model, opt, reducer, data, dtype):
    opt.zero_grad()
    reducer.start_step(1)
    for x, y in data:
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
    reducer.finish()
    opt.step()


def test_model_space_state_continues_the_optimizer_exactly():
    # Two steps, then the Adam state in model space handed to a new optimizer over a copy of the model:
    # the next step is identical to the original optimizer's.
    model = _model(torch.bfloat16)
    reducer = DataParallelGradReducer(model.parameters(), bucket_size=100)
    opt = MixedPrecisionOptimizer(reducer, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    data = _batches(3)
    for step in range(2):
        _step(model, opt, reducer, data[step:step + 1], torch.bfloat16)
    records = opt.model_space_state()
    assert {record["step"] for record in records.values()} == {2}
    assert all(record["master"].dtype == torch.float32 for record in records.values())  # bf16 weights: fp32 masters
    twin = copy.deepcopy(model)
    twin_reducer = DataParallelGradReducer(twin.parameters(), bucket_size=100)
    twin_opt = MixedPrecisionOptimizer(twin_reducer, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    by_position = dict(zip(model.parameters(), twin.parameters()))
    twin_opt.load_model_space_state({by_position[param]: record for param, record in records.items()})
    _step(model, opt, reducer, data[2:], torch.bfloat16)
    _step(twin, twin_opt, twin_reducer, data[2:], torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a.master, b.master) for a, b in zip(opt.fragments, twin_opt.fragments))
