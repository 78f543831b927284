"""Data parallelism: fp32 gradient buffers, reduced over the data-parallel group in buckets.

Every parameter gets a `main_grad`, an fp32 view into one flat buffer per bucket. A hook
adds each backward's gradient into it and frees `param.grad`, so gradients accumulate in
fp32 over micro-batches whatever the compute dtype. A bucket's collective starts as soon
as all of its parameters have received their last micro-batch's gradient, so reduction
overlaps the rest of the backward pass; `finish()` waits for the stragglers.

With the distributed optimizer each data-parallel rank only needs the reduced gradient of
the slice of parameters it updates, so buckets are reduce-scattered instead of all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class GradBucket:
    """A flat fp32 gradient buffer covering a run of parameters."""

    params: list[torch.nn.Parameter]
    buffer: torch.Tensor  # [numel padded to a multiple of the dp size], fp32
    pending: int = 0  # backward hooks still expected before the bucket is complete
    work: object = None  # the in-flight collective, if any
    offsets: dict = field(default_factory=dict)  # param -> (start, numel) in buffer


class DataParallelGradReducer:
    """Owns every parameter's fp32 `main_grad` and averages it over the data-parallel group."""

    def __init__(
        self,
        params,
        group: dist.ProcessGroup | None = None,
        bucket_size: int = 40_000_000,
        overlap: bool = True,
        reduce_scatter: bool = False,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.overlap = overlap and self.world > 1
        self.reduce_scatter = reduce_scatter
        self.buckets = self._make_buckets(bucket_size)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._expected_backwards = 1
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _make_buckets(self, bucket_size: int) -> list[GradBucket]:
        # Reverse order: backward produces gradients roughly from the last layer back,
        # so the first bucket to fill is the one holding the last parameters.
        groups, current, current_numel = [], [], 0
        for param in reversed(self.params):
            current.append(param)
            current_numel += param.numel()
            if current_numel >= bucket_size:
                groups.append(current)
                current, current_numel = [], 0
        if current:
            groups.append(current)
        buckets = []
        for members in groups:
            numel = sum(p.numel() for p in members)
            padded = -(-numel // self.world) * self.world  # divisible for reduce-scatter
            device = members[0].device
            bucket = GradBucket(members, torch.zeros(padded, dtype=torch.float32, device=device))
            start = 0
            for param in members:
                bucket.offsets[id(param)] = (start, param.numel())
                param.main_grad = bucket.buffer[start : start + param.numel()].view_as(param)
                start += param.numel()
            buckets.append(bucket)
        return buckets

    def start_step(self, num_micro_batches: int) -> None:
        """Arm the hooks for a step of `num_micro_batches` backwards; gradients must be zeroed before."""
        self._expected_backwards = num_micro_batches
        for bucket in self.buckets:
            bucket.pending = len(bucket.params) * num_micro_batches
            bucket.work = None

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        if bucket.pending == 0 and self.overlap:
            self._launch(bucket)

    def _launch(self, bucket: GradBucket) -> None:
        if self.world == 1:
            return
        bucket.buffer.div_(self.world)
        if self.reduce_scatter:
            # buffer [n] -> this rank's shard [n / dp], summed over dp ranks (in place, shard view).
            shard = self.local_shard(bucket)
            bucket.work = dist.reduce_scatter_tensor(shard, bucket.buffer, group=self.group, async_op=True)
        else:
            # buffer [n] -> buffer [n], summed over dp ranks.
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def local_shard(self, bucket: GradBucket) -> torch.Tensor:
        """This dp rank's contiguous slice [n / dp] of a bucket's buffer."""
        size = bucket.buffer.numel() // self.world
        rank = dist.get_rank(self.group) if self.world > 1 else 0
        return bucket.buffer[rank * size : (rank + 1) * size]

    def finish(self) -> None:
        """Wait for (or launch) every bucket's collective; main_grad then holds the dp-averaged gradient."""
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None

    def zero_grad(self) -> None:
        """Zero every main_grad (the buffers are reused, never reallocated)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
        for param in self.params:
            param.grad = None

    def remove_hooks(self) -> None:
        """Detach from the parameters (e.g. before handing the model to another engine)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
