"""How gradients become weight updates: megagrow's own path, or the DeepSpeed engine.

Both present the Trainer with the same small interface, so the schedule, the data and
the logging do not care which one runs:

    forward_model       what to call for the forward pass (the model, or the engine wrapping it)
    loss_scale          multiply the loss by this before backward (fp16)
    current_lr()        learning rate of the next update
    start_step(n)       before the n micro-batch backwards of one iteration
    finish_step()       reduce, sum replicated partial gradients, clip, update -> StepResult
    skip_counts(result) whether a skipped step counts toward --max-consecutive-skipped-steps
    optimizer_record()  the stage's Adam state in model space, by parameter name (collective over dp)
    load_optimizer_record(record)   put such a record back into this backend's own layout
"""

from __future__ import annotations

import torch.distributed as dist

from megagrow.checkpoint.optimizer_layout import stage_record
from megagrow.config import TrainConfig
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.parallel.data_parallel import DataParallelGradReducer
from megagrow.parallel.layers import sync_sequence_parallel_grads
from megagrow.training.loss_scaler import DynamicLossScaler, LossScalerConfig
from megagrow.training.lr_schedule import LRScheduleConfig, LRScheduler
from megagrow.training.mixed_precision import MixedPrecisionOptimizer, StepResult
from megagrow.training.optimizer import OptimizerConfig


def optimizer_config(train: TrainConfig) -> OptimizerConfig:
    """AdamW settings from the training flags."""
    return OptimizerConfig(lr=train.lr, weight_decay=train.weight_decay, adam_beta1=train.adam_beta1,
                           adam_beta2=train.adam_beta2, adam_eps=train.adam_eps)


def lr_schedule_config(train: TrainConfig, train_iters: int) -> LRScheduleConfig:
    """The LR and weight-decay schedule from the training flags, in samples as Megatron-LM derives it."""
    batch = train.global_batch_size
    run_iters = train.run_iters or train_iters
    decay = (train.lr_decay_iters or run_iters) * batch
    if train.lr_warmup_fraction is not None:
        warmup = train.lr_warmup_fraction * decay
    else:
        warmup = train.lr_warmup_iters * batch
    start_wd, end_wd = train.weight_decay_range()
    return LRScheduleConfig(
        lr=train.lr, min_lr=train.min_lr, warmup_samples=warmup, decay_samples=decay,
        decay_style=train.lr_decay_style, init_lr=train.lr_warmup_init,
        wsd_decay_samples=train.lr_wsd_decay_iters * batch if train.lr_wsd_decay_iters else None,
        wsd_decay_style=train.lr_wsd_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_samples=run_iters * batch, wd_incr_style=train.weight_decay_incr_style, global_batch_size=batch)


def sum_replicated_grads(model, tie_embeddings: bool, grad_attribute: str) -> None:
    """Sum partial gradients of parameters held on several ranks (sequence-parallel norms over tp,
    tied embeddings over the first and last stage); sums commute with the dp average."""
    if model.sequence_parallel:
        sync_sequence_parallel_grads(model, use_main_grad=grad_attribute == "main_grad")
    group = state.embedding_group()
    if tie_embeddings and state.pp_size() > 1 and group is not None:
        for param in model.parameters():
            grad = getattr(param, grad_attribute, None)
            if getattr(param, "shared_embedding", False) and grad is not None:
                dist.all_reduce(grad, group=group)  # [vocab/t, h] summed over both copies


class NativeOptimization:
    """fp32 gradient buffers reduced over dp, fp32 master weights, AdamW, megagrow's LR schedule."""

    def __init__(self, model, train: TrainConfig, train_iters: int, tie_embeddings: bool):
        self.model, self.tie_embeddings = model, tie_embeddings
        self.reducer = DataParallelGradReducer(model.parameters(), group=state.dp_group(),
                                               overlap=train.overlap_grad_reduce,
                                               reduce_scatter=train.use_distributed_optimizer)
        scaler = None
        if train.precision == "fp16":
            scaler = DynamicLossScaler(LossScalerConfig(train.initial_loss_scale, train.min_loss_scale,
                                                        train.loss_scale_window, train.hysteresis))
        self.optimizer = MixedPrecisionOptimizer(self.reducer, optimizer_config(train), clip_grad=train.clip_grad,
                                                 loss_scaler=scaler, shard_over_dp=train.use_distributed_optimizer)
        self.scheduler = LRScheduler(self.optimizer, lr_schedule_config(train, train_iters))
        self.forward_model = model

    @property
    def loss_scale(self) -> float:
        return self.optimizer.loss_scale

    def current_lr(self) -> float:
        """Learning rate of the next update."""
        return self.scheduler.get_lr()

    def start_step(self, num_micro_batches: int) -> None:
        """Zero the buffers and arm the reduction hooks for this iteration's backwards."""
        self.optimizer.zero_grad()
        self.reducer.start_step(num_micro_batches)

    def finish_step(self) -> StepResult:
        """Finish the dp reduction, sum replicated grads, and take the optimizer step."""
        self.reducer.finish()
        sum_replicated_grads(self.model, self.tie_embeddings, "main_grad")
        result = self.optimizer.step()
        if not result.skipped:
            self.scheduler.step()
        return result

    def skip_counts(self, result: StepResult) -> bool:
        """An fp16 overflow while the loss scale can still back off is routine, not divergence."""
        scaler = self.optimizer.loss_scaler
        return scaler is None or result.loss_scale <= scaler.config.min_scale

    def optimizer_record(self) -> dict:
        """The stage's Adam state in model space, by parameter name (collective over dp with the distributed optimizer)."""
        names = {param: name for name, param in self.model.named_parameters()}
        states = self.optimizer.model_space_state()
        return stage_record({names[param]: record for param, record in states.items()}, self.optimizer.loss_scaler_state())

    def stage_weights(self) -> dict:
        """The stage's weights for a checkpoint."""
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()}

    def load_optimizer_record(self, record: dict) -> None:
        """Put a model-space record into the optimizer's fragments."""
        params = dict(self.model.named_parameters())
        load_record_checked(record, params, self.optimizer.load_model_space_state)
        self.optimizer.load_loss_scaler_state(record.get("loss_scaler"))


def load_record_checked(record: dict, params: dict, load) -> None:
    """Check a record's names against this stage's parameters and hand it to `load` by parameter."""
    unknown = sorted(set(record["params"]) - set(params))
    if unknown:
        raise UserError(f"the optimizer state names {unknown[:3]}, which this stage does not have; it was saved for "
                        f"another model or pipeline split (pass --no-load-optim to start the optimizer afresh)")
    for name, state in record["params"].items():
        shape = tuple(getattr(params[name], "ds_shape", params[name].shape))  # ZeRO-3 keeps a partition
        if tuple(state["exp_avg"].shape) != shape:
            raise UserError(f"the optimizer state of {name} has shape {tuple(state['exp_avg'].shape)}, the parameter "
                            f"{shape}; it was saved with another tensor-parallel size")
    load({params[name]: state for name, state in record["params"].items()})


def build_optimization(model, train: TrainConfig, parallel, train_iters: int, tie_embeddings: bool):
    """The optimization backend the flags ask for: DeepSpeed with --deepspeed, else the native one."""
    if train.deepspeed:
        from megagrow.training.deepspeed_backend import DeepSpeedOptimization

        return DeepSpeedOptimization(model, train, parallel, train_iters, tie_embeddings)
    return NativeOptimization(model, train, train_iters, tie_embeddings)

