"""1F1B over gloo ranks gives the gradients of plain gradient accumulation on one process."""

import pytest
import torch

from distributed_harness import run_distributed
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.parallel.pipeline import (
    PipelineCommunicator,
    current_stage_position,
    forward_backward_1f1b,
    forward_only,
    partition_layers,
)

HIDDEN, SEQ, MICRO_BATCH, LAYERS = 8, 4, 2, 4


def _full_model():
    torch.manual_seed(0)
    return torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh()) for _ in range(LAYERS))


def _micro_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=g), torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=g)) for _ in range(n)]


def _reference(num_micro_batches):
    layers = _full_model()
    losses = []
    for x, y in _micro_batches(num_micro_batches):
        for layer in layers:
            x = layer(x)
        loss = torch.nn.functional.mse_loss(x, y)
        (loss / num_micro_batches).backward()
        losses.append(loss.item())
    return losses, [p.grad.clone() for p in layers.parameters()]


def _pipeline_worker(num_stages, num_micro_batches, evaluate):
    state.initialize(tp=1, pp=num_stages, dp=1)
    try:
        position = current_stage_position()
        layers = _full_model()
        mine = partition_layers(LAYERS, num_stages)[position.stage]
        stage_layers = [layers[i] for i in mine]
        data = _micro_batches(num_micro_batches)

        def forward_step(index, activation):
            x = data[index][0] if position.is_first else activation
            for layer in stage_layers:
                x = layer(x)
            return torch.nn.functional.mse_loss(x, data[index][1]) if position.is_last else x

        comm = PipelineCommunicator(position, (SEQ, MICRO_BATCH, HIDDEN), torch.float32, torch.device("cpu"))
        if evaluate:
            losses = forward_only(forward_step, num_micro_batches, comm)
        else:
            losses = forward_backward_1f1b(forward_step, num_micro_batches, comm)
        grads = {i: [p.grad.clone() if p.grad is not None else None for p in layers[i].parameters()] for i in mine}
        return [loss.item() for loss in losses], grads
    finally:
        state.destroy()


@pytest.mark.parametrize("num_stages, num_micro_batches", [(2, 4), (4, 6), (4, 2)])
def test_1f1b_matches_gradient_accumulation(num_stages, num_micro_batches):
    ref_losses, ref_grads = _reference(num_micro_batches)
    results = run_distributed(_pipeline_worker, num_stages, num_stages, num_micro_batches, False)
    assert results[-1][0] == pytest.approx(ref_losses, rel=1e-6)
    grads = {}
    for _, stage_grads in results:
        grads.update(stage_grads)
    flat = [g for i in range(LAYERS) for g in grads[i]]
    for got, expected in zip(flat, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_forward_only_gives_the_losses_and_no_gradients():
    ref_losses, _ = _reference(3)
    results = run_distributed(_pipeline_worker, 2, 2, 3, True)
    assert results[-1][0] == pytest.approx(ref_losses, rel=1e-6)
    assert all(g is None for _, grads in results for gs in grads.values() for g in gs)


def test_layer_partitioning():
    assert partition_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert partition_layers(7, 3, [3, 2, 2]) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(UserError, match="not divisible"):
        partition_layers(7, 2)
    with pytest.raises(UserError, match="adding up"):
        partition_layers(7, 2, [3, 3])
