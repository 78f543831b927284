"""Pipeline parallelism: layer partitioning, point-to-point activation exchange, 1F1B schedule.

Every stage exchanges tensors of one fixed shape, [s, b, h] (s = sequence length, divided
by the tensor-parallel size under sequence parallelism; b = micro-batch size; h = hidden
size), so receive buffers are allocated without a shape handshake. Sends and receives
that happen together are issued as one batch of non-blocking ops so that neighbouring
stages never wait on each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megagrow.errors import UserError
from megagrow.parallel import state


def partition_layers(num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None,
                     stages_flag: str = "--pipeline-model-parallel-size") -> list[range]:
    """Global layer ranges of each stage: even by default, or the explicit split given (errors name `stages_flag`)."""
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
            raise UserError(
                f"--pipeline-layer-split {list(layers_per_stage)} must give {num_stages} positive counts "
                f"adding up to --num-layers {num_layers}"
            )
        counts = list(layers_per_stage)
    else:
        if num_layers % num_stages != 0:
            raise UserError(
                f"--num-layers {num_layers} is not divisible by {stages_flag} {num_stages}; "
                f"change one, or give an uneven split with --pipeline-layer-split"
            )
        counts = [num_layers // num_stages] * num_stages
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@dataclass
class StagePosition:
    """Where a stage sits in its pipeline, with the global ranks of its neighbours (None at the ends)."""

    stage: int
    num_stages: int
    prev_rank: int | None
    next_rank: int | None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def current_stage_position() -> StagePosition:
    """This rank's StagePosition from the process groups in megagrow.parallel.state."""
    ranks, stage = state.pp_group_ranks(), state.pp_rank()
    prev_rank = ranks[stage - 1] if stage > 0 else None
    next_rank = ranks[stage + 1] if stage < len(ranks) - 1 else None
    return StagePosition(stage, len(ranks), prev_rank, next_rank)


class PipelineCommunicator:
    """Point-to-point exchange of [s, b, h] activations and their gradients between adjacent stages."""

    def __init__(self, position: StagePosition, tensor_shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.position = position
        self.tensor_shape = tuple(tensor_shape)
        self.dtype = dtype
        self.device = device

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device)

    def _exchange(self, send: torch.Tensor | None, send_to: int | None, recv_from: int | None) -> torch.Tensor | None:
        ops, received = [], None
        if send is not None and send_to is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), send_to))
        if recv_from is not None:
            received = self._buffer()
            ops.append(dist.P2POp(dist.irecv, received, recv_from))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received

    def recv_forward(self) -> torch.Tensor | None:
        """Activation [s, b, h] from the previous stage (None on the first stage)."""
        return self._exchange(None, None, self.position.prev_rank)

    def send_forward(self, output: torch.Tensor) -> None:
        """Activation [s, b, h] to the next stage (no-op on the last stage)."""
        self._exchange(output, self.position.next_rank, None)

    def recv_backward(self) -> torch.Tensor | None:
        """Gradient [s, b, h] of our output from the next stage (None on the last stage)."""
        return self._exchange(None, None, self.position.next_rank)

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        """Gradient [s, b, h] of our input to the previous stage (no-op on the first stage)."""
        self._exchange(input_grad, self.position.prev_rank, None)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        """Send activation [s, b, h] forward and receive the gradient [s, b, h] of an earlier one."""
        return self._exchange(output, self.position.next_rank, self.position.next_rank)

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Send input gradient [s, b, h] back and receive the next activation [s, b, h]."""
        return self._exchange(input_grad, self.position.prev_rank, self.position.prev_rank)


# forward_step(micro_batch_index, input_activation or None) -> output activation, or on the
# last stage the micro-batch's mean loss (a scalar tensor).
ForwardStep = Callable[[int, "torch.Tensor | None"], torch.Tensor]


def _backward(input_tensor, output, output_grad, loss_scale: float, is_last: bool):
    if is_last:
        torch.autograd.backward(output * loss_scale)
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    return input_tensor.grad if input_tensor is not None else None


def _forward(forward_step: ForwardStep, index: int, input_tensor, losses: list, is_last: bool):
    if input_tensor is not None:
        input_tensor.requires_grad_(True)
    output = forward_step(index, input_tensor)
    if is_last:
        losses.append(output.detach())
    return output


def forward_backward_1f1b(
    forward_step: ForwardStep,
    num_micro_batches: int,
    comm: PipelineCommunicator,
    loss_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Run one global batch through the 1F1B schedule; returns the last stage's per-micro-batch losses.

    Stage k of P first runs P-k-1 warm-up forwards, then alternates one forward with one
    backward, then drains the remaining backwards, so at most P-k micro-batches of
    activations are alive at once. Gradients accumulate in .grad; the loss of each
    micro-batch is scaled by loss_scale / num_micro_batches before backward.
    """
    position = comm.position
    is_last = position.is_last
    scale = loss_scale / num_micro_batches
    num_warmup = min(position.num_stages - position.stage - 1, num_micro_batches)
    num_steady = num_micro_batches - num_warmup
    losses: list[torch.Tensor] = []
    in_flight: list[tuple[torch.Tensor | None, torch.Tensor]] = []

    for i in range(num_warmup):
        input_tensor = comm.recv_forward()
        output = _forward(forward_step, i, input_tensor, losses, is_last)
        comm.send_forward(output)
        in_flight.append((input_tensor, output))

    input_tensor = comm.recv_forward() if num_steady > 0 else None
    for i in range(num_steady):
        output = _forward(forward_step, num_warmup + i, input_tensor, losses, is_last)
        output_grad = comm.send_forward_recv_backward(output)
        in_flight.append((input_tensor, output))
        oldest_input, oldest_output = in_flight.pop(0)
        input_grad = _backward(oldest_input, oldest_output, output_grad, scale, is_last)
        if i == num_steady - 1:
            comm.send_backward(input_grad)
        else:
            input_tensor = comm.send_backward_recv_forward(input_grad)

    for _ in range(num_warmup):
        oldest_input, oldest_output = in_flight.pop(0)
        output_grad = comm.recv_backward()
        comm.send_backward(_backward(oldest_input, oldest_output, output_grad, scale, is_last))
    return losses


def forward_only(forward_step: ForwardStep, num_micro_batches: int, comm: PipelineCommunicator) -> list[torch.Tensor]:
    """Evaluation: forwards only, no activations kept; returns the last stage's losses."""
    losses: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(num_micro_batches):
            output = _forward(forward_step, i, comm.recv_forward(), losses, comm.position.is_last)
            comm.send_forward(output)
    return losses
