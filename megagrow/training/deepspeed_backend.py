"""The DeepSpeed engine as the Trainer's optimization backend (ZeRO 1/2/3, offload via the json).

megagrow keeps its own model, tensor parallelism and 1F1B pipeline; DeepSpeed takes over
what happens to gradients: their reduction and partitioning over data-parallel ranks
(ZeRO), mixed precision, clipping and the optimizer step. The engine runs with
`managed_gradient_accumulation: false`, so backward passes (issued by megagrow's
schedule) only accumulate and `engine.step()` once per iteration is the boundary that
reduces and updates. DeepSpeed's own PipelineEngine is not used: it would need the model
rewritten as a PipelineModule, and megagrow's schedule already does the job.

Checkpoints are megagrow's (Megatron-LM's format, `--ckpt-format`), not DeepSpeed's: the
engine's weights and Adam state are gathered into model space on save and scattered back on
load (megagrow/training/deepspeed_state.py), so a DeepSpeed run resumes under any ZeRO stage,
by megagrow's own optimizer, or grows, and no checkpoint is ever unpickled by the engine.

With pipeline parallelism only ZeRO-1 is accepted: ZeRO-2/3 partition gradients (and
ZeRO-3 the weights) over dp ranks during every backward, which under a pipeline schedule
means a reduce-scatter (and all-gathers) per micro-batch instead of one per step — the
combination Megatron-DeepSpeed refuses too.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch

from megagrow.config import ParallelConfig, TrainConfig
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.training.clip_grads import global_grad_norm
from megagrow.training.lr_schedule import LRScheduler
from megagrow.training.mixed_precision import StepResult
from megagrow.training.deepspeed_state import load_model_space_record, model_space_record, stage_weights
from megagrow.training.optimization import (
    load_record_checked,
    lr_schedule_config,
    optimizer_config,
    sum_replicated_grads,
)
from megagrow.training.optimizer import build_adamw, weight_decay_groups

logger = logging.getLogger("megagrow.training")


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed queries, backed by megagrow.parallel.state."""

    def get_model_parallel_rank(self) -> int:
        return state.mp_rank()

    def get_model_parallel_world_size(self) -> int:
        return state.tp_size() * state.pp_size()

    def get_model_parallel_group(self):
        return state.mp_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return state.tp_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return state.tp_size()

    def get_tensor_model_parallel_group(self):
        return state.tp_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return state.pp_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return state.pp_size()

    def get_pipeline_model_parallel_group(self):
        return state.pp_group()

    def get_data_parallel_rank(self) -> int:
        return state.dp_rank()

    def get_data_parallel_world_size(self) -> int:
        return state.dp_size()

    def get_data_parallel_group(self):
        return state.dp_group()


def _agree(config: dict, key: str, value, flag: str, source: str) -> None:
    """Set config[key] = value unless the json already says something else (then refuse)."""
    current = config.get(key, "auto")
    if current not in ("auto", value):
        raise UserError(f"{source}: {key} is {current!r} but {flag} gives {value!r}; make them agree or set it to \"auto\"")
    config[key] = value


def build_deepspeed_config(train: TrainConfig, parallel: ParallelConfig, num_micro_batches: int) -> dict:
    """The engine's config: the json given, with batch, precision and clipping taken from the flags."""
    source = train.deepspeed_config or "the DeepSpeed config"
    config: dict = {}
    if train.deepspeed_config:
        try:
            with open(train.deepspeed_config) as f:
                config = json.load(f)
        except OSError as err:
            raise UserError(f"--deepspeed_config {train.deepspeed_config}: cannot read it ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise UserError(f"--deepspeed_config {train.deepspeed_config}: not valid JSON ({err.msg} at line {err.lineno})") from None
    _agree(config, "train_batch_size", train.global_batch_size, "--global-batch-size", source)
    _agree(config, "train_micro_batch_size_per_gpu", train.micro_batch_size, "--micro-batch-size", source)
    _agree(config, "gradient_accumulation_steps", num_micro_batches, "--global-batch-size / (micro batch x dp)", source)
    _agree(config, "gradient_clipping", train.clip_grad, "--clip-grad", source)
    # megagrow's schedule already averages the loss over micro-batches; the engine would
    # divide gradients by its accumulation steps a second time. So it is told of one
    # accumulation step per iteration covering all of this rank's micro-batches.
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size * num_micro_batches
    config["gradient_accumulation_steps"] = 1
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        enabled = train.precision == precision
        if section.get("enabled", "auto") not in ("auto", enabled):
            raise UserError(f"{source}: {precision}.enabled is {section['enabled']} but the flags ask for "
                            f"{train.precision}; make them agree")
        section["enabled"] = enabled
    if train.precision == "fp16":
        config["fp16"].setdefault("initial_scale_power", int(round(torch.log2(torch.tensor(train.initial_loss_scale)).item())))
        config["fp16"].setdefault("hysteresis", train.hysteresis)
        config["fp16"].setdefault("loss_scale_window", train.loss_scale_window)
        config["fp16"].setdefault("min_loss_scale", train.min_loss_scale)
    zero = config.setdefault("zero_optimization", {})
    if train.zero_stage is not None:
        zero["stage"] = train.zero_stage
    stage = int(zero.get("stage", 0))
    if parallel.pp > 1 and stage > 1:
        raise UserError(f"ZeRO-{stage} with --pipeline-model-parallel-size {parallel.pp}: ZeRO-2/3 partition gradients "
                        f"over data-parallel ranks on every backward, i.e. once per micro-batch under a pipeline; "
                        f"use --zero-stage 1 with pipeline parallelism")
    if parallel.sequence_parallel and parallel.tp > 1 and stage > 1:
        raise UserError(f"ZeRO-{stage} with --sequence-parallel: the norms' partial gradients must be summed over "
                        f"tensor-parallel ranks before ZeRO-2/3 partitions them; use --zero-stage 1")
    if stage > 1 and "overlap_comm" not in zero:
        zero["overlap_comm"] = False  # required by the unmanaged accumulation mode below for ZeRO-3
    # megagrow's schedule issues the backwards; engine.step() is the accumulation boundary.
    config["managed_gradient_accumulation"] = False
    config.setdefault("steps_per_print", 10**9)  # megagrow logs; keep DeepSpeed quiet
    config.setdefault("wall_clock_breakdown", False)
    return config


def _mark_tensor_parallel(model) -> None:
    # DeepSpeed's norm and clipping count a parameter once per model-parallel group unless
    # it is marked as split over tensor-parallel ranks (then every shard counts).
    for param in model.parameters():
        dim = getattr(param, "tp_partition_dim", None)
        param.tensor_model_parallel = dim is not None
        if dim is not None:
            param.partition_dim = dim
            param.partition_stride = 1


class DeepSpeedOptimization:
    """Gradients and updates handled by a DeepSpeed engine; see the module docstring."""

    def __init__(self, model, train: TrainConfig, parallel: ParallelConfig, train_iters: int, tie_embeddings: bool):
        try:
            import deepspeed
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install 'megagrow[deepspeed]'") from None
        from megagrow.training.trainer import micro_batches_per_step

        self.model, self.tie_embeddings = model, tie_embeddings
        self.config = build_deepspeed_config(train, parallel, micro_batches_per_step(train, parallel.dp))
        self.zero_stage = int(self.config["zero_optimization"].get("stage", 0))
        _mark_tensor_parallel(model)
        schedule = lr_schedule_config(train, train_iters)
        optimizer = None
        if "optimizer" not in self.config:  # a json "optimizer" section (e.g. for ZeRO-Offload) wins
            optimizer = build_adamw(model.parameters(), optimizer_config(train))
        # DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor:
        # torch's FutureWarning would print on every rank and no user can act on it.
        warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                                category=FutureWarning)
        # DeepSpeed asserts the launcher's variables; a single process started without a
        # launcher (pretrain_gpt.py gave it a one-rank group) gets what a launcher would set.
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
        # Weight-decay groups also when DeepSpeed builds the optimizer from the json.
        groups = weight_decay_groups(model.parameters(), train.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups,
            lr_scheduler=lambda opt: LRScheduler(opt, schedule), mpu=DeepSpeedMPU(), config=self.config,
            dist_init_required=False)  # megagrow made the process group (a one-rank one for a single process)
        # ZeRO 1-3: forward through the engine, whose output hooks arm the ZeRO optimizer for the
        # backwards megagrow's schedule issues (ZeRO-2/3 reduce and partition gradients there).
        # ZeRO-0 has no ZeRO optimizer to arm, and without one DeepSpeed's hooks refuse every
        # backward not issued by engine.backward(scalar loss) - which a pipeline stage's
        # backward from its output gradient cannot be. Nothing needs to run during a ZeRO-0
        # backward anyway: with unmanaged accumulation engine.step() all-reduces .grad over dp.
        self.forward_model = self.engine if self.zero_stage > 0 else self.engine.module
        self._measured_norm: float | None = None
        if self.zero_stage == 0:
            self._measure_norm_after_reduce()
        logger.info("DeepSpeed engine: ZeRO stage %d, %s, optimizer %s", self.zero_stage, train.precision,
                    type(self.optimizer).__name__)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0) if self.config["fp16"]["enabled"] else 1.0

    def current_lr(self) -> float:
        """Learning rate of the next update."""
        return self.scheduler.get_lr()

    def start_step(self, num_micro_batches: int) -> None:
        """Nothing to arm: the engine zeroes gradients after each step."""

    def finish_step(self) -> StepResult:
        """Sum replicated grads (ZeRO-0/1 keep them in .grad), then the engine reduces, clips and updates."""
        if self.zero_stage <= 1:
            sum_replicated_grads(self.model, self.tie_embeddings, "grad")
        scale = self.loss_scale
        self._measured_norm = None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._measured_norm
        norm = float(norm) if norm is not None else float("nan")
        return StepResult(norm, not self.engine.was_step_applied(), scale)

    def _measure_norm_after_reduce(self) -> None:
        """ZeRO-0 keeps no gradient norm (its fp32 clipping discards it): measure it where engine.step() has just
        averaged .grad over dp and not yet clipped, as Megatron reports it."""
        reduce = self.engine.allreduce_gradients
        params = [p for p in self.model.parameters() if p.requires_grad]

        def reduce_then_measure(*args, **kwargs):
            reduce(*args, **kwargs)
            self._measured_norm = global_grad_norm([(p, p.grad) for p in params if p.grad is not None],
                                                   sharded_over_dp=False)

        self.engine.allreduce_gradients = reduce_then_measure

    def skip_counts(self, result: StepResult) -> bool:
        """fp16 overflows are the engine's business while its scale can back off."""
        return not self.config["fp16"]["enabled"]

    def stage_weights(self) -> dict:
        """The stage's weights for a checkpoint (ZeRO-3's partitions gathered; collective)."""
        return stage_weights(self.model, self.zero_stage)

    def optimizer_record(self) -> dict:
        """The stage's Adam state in model space, by parameter name (collective over dp)."""
        record = model_space_record(self.engine, self.model)
        if self.config["fp16"]["enabled"]:
            record["loss_scaler"] = {"scale": float(self.loss_scale)}
        return record

    def load_optimizer_record(self, record: dict) -> None:
        """Scatter a model-space record into the engine's ZeRO partitions."""
        load_record_checked(record, dict(self.model.named_parameters()),
                            lambda _: load_model_space_record(self.engine, self.model, record))
        scale = (record.get("loss_scaler") or {}).get("scale")
        if scale is not None and hasattr(self.optimizer, "cur_scale"):
            self.optimizer.cur_scale = scale
