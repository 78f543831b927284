"""Data-parallel gradient reduction and the sharded (ZeRO-1 style) optimizer versus one process."""

import pytest
import torch

from distributed_harness import run_distributed
from megagrow.parallel import state
from megagrow.parallel.data_parallel import DataParallelGradReducer
from megagrow.training.mixed_precision import MixedPrecisionOptimizer
from megagrow.training.optimizer import OptimizerConfig

STEPS, MICRO_BATCHES, ROWS = 3, 2, 4  # ROWS per micro-batch per replica


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.LayerNorm(10), torch.nn.Linear(10, 3))


def _global_batches(dp):
    g = torch.Generator().manual_seed(2)
    return [[(torch.randn(ROWS * dp, 6, generator=g), torch.randn(ROWS * dp, 3, generator=g)) for _ in range(MICRO_BATCHES)]
            for _ in range(STEPS)]


def _train(model, batches, dp, dp_rank, shard, overlap=True):
    reducer = DataParallelGradReducer(model.parameters(), group=state.dp_group(), bucket_size=50,
                                      overlap=overlap, reduce_scatter=shard)
    opt = MixedPrecisionOptimizer(reducer, OptimizerConfig(lr=1e-2), clip_grad=0.5, shard_over_dp=shard)
    norms = []
    for step_batches in batches:
        opt.zero_grad()
        reducer.start_step(MICRO_BATCHES)
        for x, y in step_batches:
            rows = slice(dp_rank * ROWS, (dp_rank + 1) * ROWS)  # this replica's part of the micro-batch
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows]) / MICRO_BATCHES
            loss.backward()
        reducer.finish()
        norms.append(opt.step().grad_norm)
    return norms, [p.detach().clone() for p in model.parameters()]


def _dp_worker(dp, shard, overlap):
    state.initialize(tp=1, pp=1, dp=dp)
    try:
        return _train(_model(), _global_batches(dp), dp, state.dp_rank(), shard, overlap)
    finally:
        state.destroy()


@pytest.mark.parametrize("shard, overlap", [(False, True), (False, False), (True, True)])
def test_two_replicas_match_one_process_on_the_whole_batch(shard, overlap):
    dp = 2
    # One process, whole global batch: rows of both replicas at once.
    ref_norms, ref_params = _train_single(dp)
    results = run_distributed(_dp_worker, dp, dp, shard, overlap)
    for norms, params in results:
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        for got, expected in zip(params, ref_params):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _train_single(dp):
    global ROWS
    saved = ROWS
    ROWS = saved * dp  # the single process sees every replica's rows
    try:
        return _train(_model(), _global_batches_for_single(dp, saved), 1, 0, shard=False)
    finally:
        ROWS = saved


def _global_batches_for_single(dp, rows):
    global ROWS
    current, ROWS = ROWS, rows
    try:
        return _global_batches(dp)
    finally:
        ROWS = current
