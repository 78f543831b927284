"""What a training checkpoint holds, and putting it back into a Trainer.

Each (tp, pp) shard's `model_optim_rng.pt`, written by dp rank 0:

    model            the stage's state dict (tp-sharded tensors, global layer numbers)
    optimizer        fp32 masters + Adam state (absent with the distributed optimizer,
                     whose per-dp-rank slices go to distrib_optim_dpRRR.pt beside it)
    scheduler        learning-rate schedule position
    progress         iteration, consumed samples, skipped steps
    rng              Python / numpy / torch generator states
    config           model, parallel and train settings (plain dicts)
    growth           (grown checkpoints only) how the model was grown

A shard with only `model` and `config` (an exported, converted or grown model) loads as
the start of a new run: fresh optimizer, iteration 0.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from megagrow.config import TrainConfig
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.training.checkpointing import (
    get_rng_state,
    load_shard,
    read_tracker,
    save_checkpoint,
    set_rng_state,
    write_tracker,
)
from megagrow.training.optimization import NativeOptimization

logger = logging.getLogger("megagrow.training")
CHECKPOINT_VERSION = 1
# Model fields that may differ between a checkpoint and the run loading it.
_COMPATIBLE_MODEL_FIELDS = {"params_dtype", "seq_length", "max_position_embeddings", "init_method_std"}


def metrics_path(train: TrainConfig) -> Path:
    """JSONL metrics file: --metrics-file, else beside the checkpoints, else runs/metrics.jsonl."""
    if train.metrics_file:
        return Path(train.metrics_file)
    return Path(train.save) / "metrics.jsonl" if train.save else Path("runs") / "metrics.jsonl"


def _distributed_optimizer_file(dp_rank: int) -> str:
    return f"distrib_optim_dp{dp_rank:03d}.pt"


def config_record(trainer) -> dict:
    """The run's configuration as plain types, stored in every checkpoint."""
    return {"model": asdict(trainer.model_config), "parallel": asdict(trainer.parallel), "train": asdict(trainer.train)}


def _client_state(trainer) -> dict:
    return {"checkpoint_version": CHECKPOINT_VERSION, "progress": asdict(trainer.progress), "rng": get_rng_state(),
            "config": config_record(trainer)}


def save(trainer) -> None:
    """Collectively save the trainer's state at its current iteration to --save."""
    root, iteration = trainer.train.save, trainer.progress.iteration
    optimization = trainer.optimization
    if isinstance(optimization, NativeOptimization):
        _save_native(trainer, optimization)
    else:
        optimization.save(root, f"iter_{iteration:07d}", _client_state(trainer))
        # The same tracker as native checkpoints, so tools find the latest iteration either way.
        save_tracker = state.mp_rank() == 0 and state.dp_rank() == 0
        if save_tracker:
            write_tracker(root, iteration)
    logger.info("saved checkpoint %s at iteration %d", root, iteration)


def _save_native(trainer, optimization: NativeOptimization) -> None:
    sharded_optimizer = optimization.optimizer.shard_over_dp
    shard = None
    if state.dp_rank() == 0:
        shard = {"model": trainer.model.state_dict(), "scheduler": optimization.scheduler.state_dict(),
                 **_client_state(trainer)}
        if not sharded_optimizer:
            shard["optimizer"] = optimization.optimizer.state_dict()
    extra = None
    if sharded_optimizer:
        extra = {_distributed_optimizer_file(state.dp_rank()): optimization.optimizer.state_dict()}
    save_checkpoint(trainer.train.save, trainer.progress.iteration, shard, tp_rank=state.tp_rank(),
                    pp_rank=state.pp_rank(), pp_size=state.pp_size(), extra_files=extra)


def check_model_config(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint whose architecture differs from the run's, naming every differing field."""
    differing = [
        f"{name} {saved.get(name)!r} (checkpoint) vs {current.get(name)!r} (this run)"
        for name in sorted(set(saved) | set(current))
        if name not in _COMPATIBLE_MODEL_FIELDS and saved.get(name) != current.get(name)
    ]
    if differing:
        raise UserError(f"--load {where}: the checkpoint's model differs from this run's: {'; '.join(differing)}; "
                        f"pass the same model flags (or grow/convert the checkpoint first)")


def is_deepspeed_checkpoint(root) -> bool:
    """Whether root was saved by the DeepSpeed backend (it holds DeepSpeed's 'latest' tag file)."""
    return (Path(root) / "latest").is_file()


def load_weights(trainer) -> dict | None:
    """Phase 1, before the optimizer exists: put a native checkpoint's weights into the model.

    Optimizers copy the weights when they are built (fp32 masters, ZeRO partitions), so the
    weights must be in place first. Returns the loaded shard, or None (no checkpoint yet, or
    a DeepSpeed checkpoint, which the engine loads in phase 2).
    """
    root = trainer.train.load
    iteration = read_tracker(root)
    if iteration is None:
        logger.warning("--load %s holds no checkpoint yet; training from scratch", root)
        return None
    if is_deepspeed_checkpoint(root):
        if not trainer.train.deepspeed:
            raise UserError(f"--load {root}: this is a DeepSpeed checkpoint; add --deepspeed, or convert it with "
                            f"tools/convert_deepspeed_checkpoint.py")
        return None
    location = dict(iteration=iteration, tp_rank=state.tp_rank(), pp_rank=state.pp_rank(), pp_size=state.pp_size())
    shard = load_shard(root, **location)
    check_model_config(shard.get("config", {}).get("model", {}), asdict(trainer.model_config), str(root))
    missing, unexpected = trainer.model.load_state_dict(shard["model"], strict=False)
    if missing or unexpected:
        raise UserError(f"--load {root}: shard tensors do not match this stage (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); was it saved with another --pipeline-layer-split?")
    shard["location"] = location
    return shard


def load_training_state(trainer, shard: dict | None) -> None:
    """Phase 2, with the optimizer built: optimizer, schedule, progress and RNG (or the engine's checkpoint)."""
    root, train = trainer.train.load, trainer.train
    optimization = trainer.optimization
    if shard is None:
        if read_tracker(root) is not None and is_deepspeed_checkpoint(root):
            client_state = optimization.load(root, load_optimizer=not train.no_load_optim)
            check_model_config(client_state["config"]["model"], asdict(trainer.model_config), str(root))
            _restore_progress(trainer, client_state, root)
        return
    if "progress" not in shard:
        logger.info("loaded model weights from %s; starting a new run at iteration 0", root)
        return
    if not isinstance(optimization, NativeOptimization):
        if not train.no_load_optim:
            raise UserError(f"--load {root}: a native checkpoint's optimizer state cannot be given to DeepSpeed; "
                            f"pass --no-load-optim to continue from its weights with a fresh optimizer")
        _restore_progress(trainer, shard, root)
        return
    if not train.no_load_optim:
        location = shard["location"]
        if optimization.optimizer.shard_over_dp:
            optimizer_state = load_shard(root, filename=_distributed_optimizer_file(state.dp_rank()), **location)
        else:
            optimizer_state = shard.get("optimizer")
        if optimizer_state is None:
            raise UserError(f"--load {root}: the checkpoint has no optimizer state for this layout; "
                            f"pass --no-load-optim to start the optimizer afresh")
        optimization.optimizer.load_state_dict(optimizer_state)
        optimization.scheduler.load_state_dict(shard["scheduler"])
    _restore_progress(trainer, shard, root)


def _restore_progress(trainer, saved: dict, root) -> None:
    for name, value in saved["progress"].items():
        setattr(trainer.progress, name, value)
    if not trainer.train.no_load_rng:
        set_rng_state(saved["rng"])
    logger.info("resumed from %s at iteration %d (%d samples consumed)", root, trainer.progress.iteration,
                trainer.progress.consumed_samples)
