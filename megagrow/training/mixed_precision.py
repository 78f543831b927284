"""fp32 master weights around AdamW, optionally sharded over data-parallel ranks (ZeRO-1 style).

The model computes in its own dtype (fp32, bf16 or fp16); the optimizer always updates
fp32 master copies from the fp32 `main_grad` buffers of `DataParallelGradReducer`:

* unsharded: one master per parameter (the parameter itself when the model is fp32);
* sharded (`--use-distributed-optimizer`): each dp rank owns a contiguous slice of every
  gradient bucket, keeps masters and Adam state for just that slice, and after its
  update the slices are all-gathered back into the model parameters. Adam is
  elementwise, so updating slices gives bit-for-bit the same result as whole tensors.

A step unscales fp16 gradients, computes the global norm, skips the update when the
norm is not finite (counted, and the fp16 scale backs off), clips, steps and copies back.

Checkpoints hold the Adam state in model space (megagrow/checkpoint/optimizer_layout.py):
`model_space_state` gathers each parameter's moments and master over the dp ranks that
hold slices of it, `load_model_space_state` cuts a rank's slices back out, so a checkpoint
resumes under any dp size, sharded or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagrow.parallel.data_parallel import DataParallelGradReducer
from megagrow.training.clip_grads import clip_by_norm, global_grad_norm
from megagrow.training.loss_scaler import DynamicLossScaler
from megagrow.checkpoint.optimizer_layout import EXP_AVG, EXP_AVG_SQ, MASTER, param_state, uses_weight_decay
from megagrow.training.optimizer import OptimizerConfig, build_adamw


@dataclass
class _Fragment:
    """The part [start, end) of a flattened model parameter that this rank's optimizer updates."""

    param: torch.nn.Parameter
    start: int
    end: int
    master: torch.nn.Parameter  # fp32; the parameter itself when no copy is needed
    grad: torch.Tensor  # fp32 view of the reduced gradient in the reducer's bucket buffer


@dataclass
class StepResult:
    """What happened in one optimizer step."""

    grad_norm: float
    skipped: bool
    loss_scale: float


class MixedPrecisionOptimizer:
    """AdamW on fp32 masters fed by the reducer's main_grad buffers; see the module docstring."""

    def __init__(
        self,
        reducer: DataParallelGradReducer,
        config: OptimizerConfig,
        clip_grad: float = 1.0,
        loss_scaler: DynamicLossScaler | None = None,
        shard_over_dp: bool = False,
    ):
        self.reducer = reducer
        self.clip_grad = clip_grad
        self.loss_scaler = loss_scaler
        self.shard_over_dp = shard_over_dp and reducer.world > 1
        if self.shard_over_dp and not reducer.reduce_scatter:
            raise ValueError("a sharded optimizer needs a reducer built with reduce_scatter=True")
        self.fragments = self._make_fragments()
        masters = [f.master for f in self.fragments]
        decays = {id(f.master): uses_weight_decay(f.param) for f in self.fragments}
        self.optimizer = build_adamw(masters, config, decays=decays)

    def _make_fragments(self) -> list[_Fragment]:
        fragments = []
        for bucket in self.reducer.buckets:
            if self.shard_over_dp:
                shard = self.reducer.local_shard(bucket)
                lo = shard.storage_offset() - bucket.buffer.storage_offset()
                hi = lo + shard.numel()
            for param in bucket.params:
                offset, numel = bucket.offsets[id(param)]
                if not self.shard_over_dp:
                    fragments.append(self._whole(param))
                    continue
                start, end = max(lo, offset), min(hi, offset + numel)
                if start < end:
                    master = param.detach().reshape(-1)[start - offset : end - offset].float().clone()
                    fragments.append(
                        _Fragment(param, start - offset, end - offset, torch.nn.Parameter(master), bucket.buffer[start:end])
                    )
        return fragments

    @staticmethod
    def _whole(param: torch.nn.Parameter) -> _Fragment:
        if param.dtype == torch.float32:
            master = param  # no copy: the model's own fp32 weights are the masters
        else:
            master = torch.nn.Parameter(param.detach().float().clone())
        return _Fragment(param, 0, param.numel(), master, param.main_grad)

    @property
    def loss_scale(self) -> float:
        """Factor the loss is multiplied by before backward (1 without fp16 scaling)."""
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    @property
    def param_groups(self):
        """The inner optimizer's groups (the LR scheduler writes 'lr' here)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Zero the fp32 gradient buffers before the next step's micro-batches."""
        self.reducer.zero_grad()

    def step(self) -> StepResult:
        """Unscale, check, clip and apply the reduced gradients; skip the update when they are not finite."""
        grads = [f.grad for f in self.fragments]
        if self.loss_scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.loss_scaler.scale)
        norm = global_grad_norm([(f.param, f.grad) for f in self.fragments], self.shard_over_dp)
        scale_used = self.loss_scale
        finite = math.isfinite(norm)
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_overflow=not finite)
        if not finite:
            return StepResult(norm, True, scale_used)
        clip_by_norm(grads, norm, self.clip_grad)
        # .grad is attached only for the update: between steps autograd must not see it,
        # or it would accumulate into the buffer behind the reducer's back.
        for f in self.fragments:
            f.master.grad = f.grad
        self.optimizer.step()
        for f in self.fragments:
            f.master.grad = None
        self._copy_masters_to_model()
        return StepResult(norm, False, scale_used)

    @torch.no_grad()
    def _copy_masters_to_model(self) -> None:
        if not self.shard_over_dp:
            for f in self.fragments:
                if f.master is not f.param:
                    f.param.copy_(f.master)
            return
        by_bucket: dict[int, list[_Fragment]] = {}
        for f in self.fragments:
            by_bucket.setdefault(id(self.reducer._bucket_of[id(f.param)]), []).append(f)
        for bucket in self.reducer.buckets:
            dtype = bucket.params[0].dtype
            # staging [n] in the model dtype; each rank fills its shard [n / dp], then all-gather.
            staging = torch.zeros(bucket.buffer.numel(), dtype=dtype, device=bucket.buffer.device)
            shard = self.reducer.local_shard(bucket)
            lo = shard.storage_offset() - bucket.buffer.storage_offset()
            for f in by_bucket.get(id(bucket), []):
                offset, _ = bucket.offsets[id(f.param)]
                staging[offset + f.start : offset + f.end].copy_(f.master)
            local = staging[lo : lo + shard.numel()].clone()
            dist.all_gather_into_tensor(staging, local, group=self.reducer.group)
            for param in bucket.params:
                offset, numel = bucket.offsets[id(param)]
                param.view(-1).copy_(staging[offset : offset + numel])

    def loss_scaler_state(self) -> dict | None:
        """The fp16 loss scaler's state (None without fp16)."""
        return self.loss_scaler.state_dict() if self.loss_scaler else None

    def load_loss_scaler_state(self, saved: dict | None) -> None:
        """Restore what loss_scaler_state gave."""
        if self.loss_scaler is not None and saved:
            self.loss_scaler.load_state_dict(saved)

    def _step_of(self, fragment: _Fragment) -> int | None:
        state = self.optimizer.state.get(fragment.master)
        if not state:
            return None
        if "step" in state:
            return int(state["step"])
        group = next(g for g in self.optimizer.param_groups if any(p is fragment.master for p in g["params"]))
        return int(group["step"])  # apex FusedAdam counts steps per group

    @torch.no_grad()
    def model_space_state(self) -> dict[torch.nn.Parameter, dict]:
        """Each parameter's Adam moments, fp32 master and step count in its own shape (collective over dp when sharded)."""
        steps = [self._step_of(f) for f in self.fragments]
        known = [s for s in steps if s is not None]
        step = torch.tensor([max(known) if known else -1], dtype=torch.int64)
        if self.shard_over_dp:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.reducer.group)  # [1] a rank may hold no fragment
        if int(step) < 0:
            return {}  # never stepped: a fresh optimizer
        records = {}
        for param, values in self._gathered(lambda f, kind: self._value(f, kind)).items():
            master = values[MASTER] if param.dtype != torch.float32 else None
            records[param] = param_state(values[EXP_AVG], values[EXP_AVG_SQ], master, int(step))
        return records

    def _value(self, fragment: _Fragment, kind: str) -> torch.Tensor:
        if kind == MASTER:
            return fragment.master.detach().reshape(-1)
        state = self.optimizer.state.get(fragment.master)
        return state[kind].reshape(-1) if state else torch.zeros(fragment.end - fragment.start)

    def _gathered(self, value_of) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """value_of(fragment, kind) of every fragment, assembled per whole parameter (all-gathered over dp if sharded)."""
        kinds = (EXP_AVG, EXP_AVG_SQ, MASTER)
        if not self.shard_over_dp:
            # Views of the optimizer's own tensors, not copies: a save reads them where they are.
            return {f.param: {kind: value_of(f, kind).view_as(f.param) for kind in kinds} for f in self.fragments}
        by_bucket: dict[int, list[_Fragment]] = {}
        for f in self.fragments:
            by_bucket.setdefault(id(self.reducer._bucket_of[id(f.param)]), []).append(f)
        gathered = {}
        for bucket in self.reducer.buckets:
            shard = self.reducer.local_shard(bucket)
            lo = shard.storage_offset() - bucket.buffer.storage_offset()
            full = {}
            for kind in kinds:
                # staging [n]: this rank fills the fragments of its slice [n / dp]; all-gather completes it.
                staging = torch.zeros(bucket.buffer.numel(), dtype=torch.float32, device=bucket.buffer.device)
                for f in by_bucket.get(id(bucket), []):
                    offset, _ = bucket.offsets[id(f.param)]
                    staging[offset + f.start : offset + f.end].copy_(value_of(f, kind))
                local = staging[lo : lo + shard.numel()].clone()
                dist.all_gather_into_tensor(staging, local, group=self.reducer.group)
                full[kind] = staging
            for param in bucket.params:
                offset, numel = bucket.offsets[id(param)]
                gathered[param] = {kind: full[kind][offset : offset + numel].view_as(param).clone() for kind in kinds}
        return gathered

    @torch.no_grad()
    def load_model_space_state(self, records: dict[torch.nn.Parameter, dict]) -> None:
        """Put model-space records (as model_space_state gives) into this rank's fragments; absent ones stay fresh."""
        for f in self.fragments:
            record = records.get(f.param)
            if record is None:
                continue
            if record[MASTER] is not None and f.master is not f.param:
                f.master.copy_(record[MASTER].reshape(-1)[f.start : f.end].view_as(f.master))
            self.optimizer.state[f.master] = {
                "step": torch.tensor(float(record["step"]), dtype=torch.float32),
                **{kind: record[kind].reshape(-1)[f.start : f.end].to(torch.float32).view_as(f.master).clone()
                   for kind in (EXP_AVG, EXP_AVG_SQ)}}
