"""The pre-training loop: one pipeline stage of a tp-sharded Llama per rank, 1F1B, dp reduction.

Per iteration: global_batch / (micro_batch * dp) micro-batches run through the 1F1B
schedule; gradients accumulate in fp32 `main_grad` buffers and are averaged over dp as
they land; replicated gradients are summed where a parameter has several partial copies
(sequence-parallel norms over tp, tied embeddings over the first/last stage); then the
fp32 master weights take one clipped AdamW step. The loss is known on the last stage; it
is averaged over dp and sent to global rank 0, which logs.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagrow.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    num_parameters,
    training_flops_per_token,
)
from megagrow.errors import UserError
from megagrow.model.llama import LlamaModel
from megagrow.parallel import state
from megagrow.parallel.pipeline import (
    PipelineCommunicator,
    current_stage_position,
    forward_backward_1f1b,
    forward_only,
    partition_layers,
)
from megagrow.training import checkpoint_state
from megagrow.data.blended_dataset import domain_names
from megagrow.training.data_setup import RunDatasets, build_datasets, micro_batch_iterator, run_domains, sample_counts
from megagrow.training.metrics import MetricsWriter, measure_throughput, peak_memory_gb, peak_tflops
from megagrow.training.mixed_precision import StepResult
from megagrow.training.optimization import build_optimization

logger = logging.getLogger("megagrow.training")

_PARAMS_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TrainProgress:
    """Where the run is; saved in every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skipped_steps: int = 0
    # Training FLOPs so far, 6 N per token with N the parameters of the model trained at the time: a grown
    # run carries its base's, so runs compare at equal compute, not only at equal tokens.
    consumed_flops: float = 0.0


def resolve_train_iters(train: TrainConfig, seq_length: int) -> int:
    """--train-iters, or --train-tokens converted to whole iterations."""
    if train.train_iters is not None:
        return train.train_iters
    return math.ceil(train.train_tokens / (train.global_batch_size * seq_length))


def micro_batches_per_step(train: TrainConfig, dp: int) -> int:
    """Micro-batches each dp rank runs per iteration; refuses batches that do not divide."""
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {train.global_batch_size} is not divisible by --micro-batch-size "
                        f"{train.micro_batch_size} x data-parallel size {dp}; make it a multiple of {per_step}")
    return train.global_batch_size // per_step


class Trainer:
    """Builds this rank's stage, optimizer and data, and runs (or resumes) training."""

    def __init__(self, model_config: ModelConfig, parallel: ParallelConfig, train: TrainConfig, data: DataConfig,
                 start=None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model_config = model_config.replace(params_dtype=_PARAMS_DTYPE[train.precision])
        self.parallel, self.train, self.data = parallel, train, data
        self.train_iters = resolve_train_iters(train, model_config.seq_length)
        self.num_micro_batches = micro_batches_per_step(train, parallel.dp)
        self.progress = TrainProgress()
        self.losses: list[tuple[int, float]] = []  # (iteration, loss) of this process's run, for tests and tools
        self.growth_record: dict | None = None  # how the model was grown in this run (checkpoints record it)
        self.stop_requested = False

        ranges = partition_layers(model_config.num_layers, parallel.pp, train.pipeline_layer_split)
        stage_layers = ranges[state.pp_rank()]
        self.model = LlamaModel(self.model_config, parallel, layer_range=(stage_layers.start, stage_layers.stop),
                                seed=train.seed, device=self.device,
                                recompute_granularity=train.recompute_granularity,
                                recompute_method=train.recompute_method, recompute_num_layers=train.recompute_num_layers,
                                cross_entropy_chunk_size=train.cross_entropy_chunk_size, compile_mlp=train.compile_mlp)
        # The weights go in before the optimizer is built (it copies them): from `start` (an object with
        # load_weights(trainer) and load_state(trainer): in-run growth, megagrow/growth/rank_growth.py) or --load.
        loaded_shard = None
        if start is not None:
            start.load_weights(self)
        elif train.load:
            loaded_shard = checkpoint_state.load_weights(self)
        self.optimization = build_optimization(self.model, train, parallel, self.train_iters,
                                               self.model_config.tie_embeddings)

        seq_per_rank = model_config.seq_length // (parallel.tp if self.model.sequence_parallel else 1)
        activation_shape = (seq_per_rank, train.micro_batch_size, model_config.hidden_size)  # [s(/tp), b, h]
        self.position = current_stage_position()
        self.comm = PipelineCommunicator(self.position, activation_shape, self.model_config.torch_dtype, self.device)
        self.flops_per_token = training_flops_per_token(model_config)
        self.compute_per_token = 6 * num_parameters(model_config)  # the 6 N of consumed_flops
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_tflops = peak_tflops(device_name, train.peak_tflops)
        if start is not None:
            start.load_state(self)
        elif train.load:
            checkpoint_state.load_training_state(self, loaded_shard)
        self.metrics = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.metrics = MetricsWriter(checkpoint_state.metrics_path(train), train.tensorboard_dir,
                                         append=self.progress.iteration > 0)
        counts = sample_counts(self.train_iters, train.global_batch_size, train.eval_iters, bool(train.eval_interval))
        self.domains, self.components = run_domains(data)
        self.datasets = RunDatasets(None, None, {})
        self.train_iterator = None
        if self.reads_data:
            self.datasets = build_datasets(data, model_config.seq_length, model_config.vocab_size, train.seed, counts)
            if self.progress.iteration < self.train_iters:
                self.train_iterator = micro_batch_iterator(
                    self.datasets.train, self.progress.consumed_samples, train.micro_batch_size, state.dp_rank(),
                    parallel.dp, data.num_workers, train.dataloader_type, train.data_sharding)
        # Evaluation is collective over the pipeline: every rank must agree on what is evaluated.
        self.has_valid = self._all_ranks_agree(self.datasets.valid is not None or not self.reads_data)
        self.domains = [d for d in self.domains
                        if self._all_ranks_agree(self.datasets.domain_valid.get(d) is not None or not self.reads_data)]
        if train.eval_interval and not self.has_valid:
            logger.warning("no validation data (the --split gives the valid split no documents); skipping evaluation")
        if self.metrics is not None and self.components and self.progress.iteration == 0:
            names = domain_names(self.components)
            self.metrics.write("mixture", 0, {"weights": {n: c.weight for n, c in zip(names, self.components)},
                                              "prefixes": {n: c.prefix for n, c in zip(names, self.components)}})

    @property
    def reads_data(self) -> bool:
        """Only the first stage (tokens) and the last stage (labels) read batches."""
        return self.position.is_first or self.position.is_last

    def _all_ranks_agree(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.MIN)  # [] true only if true everywhere
        return bool(value.item())

    # ---- one iteration ------------------------------------------------------------------

    def _forward_step(self, batches):
        def step(index: int, hidden: torch.Tensor | None) -> torch.Tensor:
            tokens = batches[index]["tokens"].to(self.device) if batches is not None else None
            output = self.optimization.forward_model(tokens[:, :-1] if self.position.is_first else None,
                                                     hidden_states=hidden,
                                                     labels=tokens[:, 1:] if self.position.is_last else None)
            return output.float().mean() if self.position.is_last else output

        return step

    def _next_batches(self, iterator, count: int):
        if iterator is None:
            return None
        try:
            return [next(iterator) for _ in range(count)]
        except StopIteration:
            raise UserError("the training data ran out before --train-iters; "
                            "check --split and the dataset size") from None

    def _average_loss(self, losses: list[torch.Tensor]) -> float:
        """Mean micro-batch loss on the last stage, averaged over dp, delivered to every stage."""
        value = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.position.is_last and losses:
            value = torch.stack(losses).mean()
            if state.dp_size() > 1:
                dist.all_reduce(value, group=state.dp_group())  # [] summed over dp replicas
                value /= state.dp_size()
        if state.pp_size() > 1:
            dist.broadcast(value, src=state.pp_group_ranks()[-1], group=state.pp_group())  # [] from the last stage
        return float(value)

    def train_step(self) -> tuple[float, StepResult]:
        """Run one global batch and one optimizer step; returns (loss, StepResult)."""
        self.model.train()
        self.optimization.start_step(self.num_micro_batches)
        batches = self._next_batches(self.train_iterator, self.num_micro_batches)
        losses = forward_backward_1f1b(self._forward_step(batches), self.num_micro_batches, self.comm,
                                       loss_scale=self.optimization.loss_scale)
        result = self.optimization.finish_step()
        return self._average_loss(losses), result

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate_on(self, dataset) -> float:
        iterator = None
        if dataset is not None:
            iterator = micro_batch_iterator(dataset, 0, self.train.micro_batch_size, state.dp_rank(),
                                            self.parallel.dp, 0)
        losses = []
        for _ in range(self.train.eval_iters):
            batches = self._next_batches(iterator, self.num_micro_batches)
            losses.append(self._average_loss(forward_only(self._forward_step(batches), self.num_micro_batches,
                                                          self.comm)))
        return sum(losses) / len(losses)

    def evaluate(self) -> dict | None:
        """Validation loss over --eval-iters global batches of the blend (the same batches every time),
        and of each domain's own validation split when the blend has several."""
        if not self.has_valid:
            return None
        self.model.eval()
        result = {"loss": self._evaluate_on(self.datasets.valid)}
        if self.domains:
            result["domain_losses"] = {name: self._evaluate_on(self.datasets.domain_valid.get(name))
                                       for name in self.domains}
        return result

    # ---- the loop ---------------------------------------------------------------------------

    def _install_signal_handlers(self):
        """SIGTERM (SLURM, torchrun) and SIGINT (Ctrl-C): save after this iteration and exit; a second one aborts.

        Returns the function that puts the previous handlers back.
        """
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {stop_signal: signal.getsignal(stop_signal) for stop_signal in handled}

        def restore() -> None:
            for stop_signal in handled:
                signal.signal(stop_signal, previous[stop_signal])

        def request_stop(signum, _frame):
            if not dist.is_initialized() or dist.get_rank() == 0:  # every rank gets it: say it once
                logger.warning("received %s: saving a checkpoint after this iteration, then exiting (send it again "
                               "to stop at once)", signal.Signals(signum).name)
            self.stop_requested = True
            restore()

        if self.train.exit_on_signal:
            for stop_signal in handled:
                signal.signal(stop_signal, request_stop)
        return restore

    def _stop_agreed(self) -> bool:
        return not self._all_ranks_agree(not self.stop_requested)  # any rank signalled

    def _account(self, result) -> None:
        progress = self.progress
        if result.skipped:
            progress.skipped_steps += 1
            if self.optimization.skip_counts(result):
                progress.consecutive_skipped_steps += 1
            logger.warning("iteration %d: non-finite grad norm, step skipped (%d in a row)", progress.iteration,
                           progress.consecutive_skipped_steps)
            if progress.consecutive_skipped_steps >= self.train.max_consecutive_skipped_steps:
                raise UserError(
                    f"training stopped at iteration {progress.iteration}: {progress.consecutive_skipped_steps} "
                    f"consecutive steps had a non-finite loss or gradient norm; lower --lr, check the data, "
                    f"or resume from the last checkpoint")
        else:
            progress.consecutive_skipped_steps = 0

    def run(self) -> TrainProgress:
        """Train until --train-iters, --exit-interval or a signal; evaluate, log and save on their intervals."""
        restore_signal_handlers = self._install_signal_handlers()
        try:
            return self._train_loop()
        finally:
            restore_signal_handlers()

    def _train_loop(self) -> TrainProgress:
        train = self.train
        window_losses: list[float] = []
        window_start, window_iters = time.perf_counter(), 0
        while self.progress.iteration < self.train_iters:
            lr = self.optimization.current_lr()
            loss, result = self.train_step()
            self.progress.iteration += 1
            self.progress.consumed_samples += train.global_batch_size
            self.progress.consumed_flops += self.compute_per_token * train.global_batch_size * self.model_config.seq_length
            self._account(result)
            self.losses.append((self.progress.iteration, loss))
            if math.isfinite(loss):
                window_losses.append(loss)
            window_iters += 1
            iteration = self.progress.iteration
            leg_ends = bool(train.exit_interval) and iteration % train.exit_interval == 0
            if iteration % train.log_interval == 0 or iteration == self.train_iters or leg_ends:
                elapsed = time.perf_counter() - window_start
                self._log_train(window_losses, window_iters, elapsed, lr, result)
                window_losses, window_start, window_iters = [], time.perf_counter(), 0
            if train.eval_interval and (iteration % train.eval_interval == 0 or iteration == self.train_iters):
                eval_started = time.perf_counter()
                self._log_valid(self.evaluate())
                window_start += time.perf_counter() - eval_started  # tokens/s and MFU count training time only
            save_now = train.save and train.save_interval and iteration % train.save_interval == 0
            if self._stop_agreed():
                checkpoint_state.save(self) if train.save else None
                if not dist.is_initialized() or dist.get_rank() == 0:
                    logger.warning("stopped by signal at iteration %d", iteration)
                break
            if leg_ends and iteration < self.train_iters:
                checkpoint_state.save(self) if train.save else None
                logger.info("exiting at iteration %d (--exit-interval %d)", iteration, train.exit_interval)
                break
            if save_now:
                save_started = time.perf_counter()
                checkpoint_state.save(self)
                window_start += time.perf_counter() - save_started
        else:
            saved_last = train.save_interval and self.progress.iteration % train.save_interval == 0
            if train.save and not saved_last:
                checkpoint_state.save(self)
        if self.metrics is not None:
            self.metrics.close()
        return self.progress

    def _log_train(self, losses, iters, elapsed, lr, result) -> None:
        if self.metrics is None:
            return
        tokens = iters * self.train.global_batch_size * self.model_config.seq_length
        world = dist.get_world_size() if dist.is_initialized() else 1
        speed = measure_throughput(tokens, elapsed, self.flops_per_token, world, self.peak_tflops)
        loss = sum(losses) / len(losses) if losses else float("nan")
        values = {
            "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
            "consumed_tokens": self.progress.consumed_samples * self.model_config.seq_length,
            "consumed_flops": self.progress.consumed_flops,
            "tokens_per_second": speed.tokens_per_second, "tflops_per_device": speed.tflops_per_device,
            "skipped_steps": self.progress.skipped_steps, "memory_gb": peak_memory_gb(self.device),
        }
        if speed.mfu is not None:
            values["mfu"] = speed.mfu
        if self.train.precision == "fp16":
            values["loss_scale"] = result.loss_scale
        self.metrics.write("train", self.progress.iteration, values)
        mfu = f" | mfu {speed.mfu:.1%}" if speed.mfu is not None else ""
        logger.info("iteration %d/%d | tokens %d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | "
                    "%.2f TFLOP/s/device%s | skipped %d | mem %.2f GB", self.progress.iteration, self.train_iters,
                    values["consumed_tokens"], loss, lr, result.grad_norm, speed.tokens_per_second,
                    speed.tflops_per_device, mfu, self.progress.skipped_steps, values["memory_gb"])

    def _log_valid(self, result: dict | None) -> None:
        if self.metrics is None or result is None:
            return
        loss = result["loss"]
        perplexity = math.exp(min(loss, 50.0))
        tokens = self.progress.consumed_samples * self.model_config.seq_length  # to compare runs of other batch sizes
        self.metrics.write("valid", self.progress.iteration, {"perplexity": perplexity, "consumed_tokens": tokens,
                                                              "consumed_flops": self.progress.consumed_flops, **result})
        domains = "".join(f" | {name} {value:.4f}" for name, value in result.get("domain_losses", {}).items())
        logger.info("validation at iteration %d | loss %.4f | perplexity %.2f%s", self.progress.iteration, loss,
                    perplexity, domains)
