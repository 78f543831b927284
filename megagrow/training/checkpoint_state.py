"""A Trainer's state saved into a checkpoint, and a checkpoint (megagrow's or Megatron-LM's) put back into a Trainer.

Saving (`--ckpt-format torch`, the default, or `torch_dist`) writes Megatron-LM's files
(megagrow/checkpoint/megatron_state.py and torch_dist.py describe them): the model under
megatron-core's names, Megatron's `args` with the data position, its LR scheduler and RNG
records, and megagrow's own record beside them — configs, progress, LR schedule and,
unless --no-save-optim, the optimizer state in model space (megagrow/checkpoint/
optimizer_layout.py), gathered from whichever backend trains: megagrow's optimizer, plain
or distributed, or DeepSpeed at any ZeRO stage. A checkpoint in DeepSpeed's own format is
refused (its engine would unpickle it); tools/convert_deepspeed_checkpoint.py reads one safely.

Loading is two-phase, because optimizers copy the weights when they are built:
`load_weights` puts the weights in before the optimizer exists, `load_training_state`
then restores progress, LR schedule, RNG and optimizer. Weights load from any checkpoint
CheckpointReader reads, in any layout: this rank's shard file directly when the layout
is the run's, else this stage's tensors gathered from the full groups; the optimizer state
regroups the same way, into any backend. Megatron-LM's optimizer state is read wherever it is
kept per parameter: its non-distributed optimizer's in either format (megagrow/checkpoint/
megatron_optimizer.py for the torch format), its fully reshardable distributed one's in
torch_dist; a torch_dist save carries megatron-core's `optimizer` record, so Megatron-LM reads
megagrow's. Its distributed optimizer's buffer layouts are refused in one line
(--no-load-optim continues with fresh Adam moments; weights, iteration, data position and
LR schedule carry over).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megagrow.checkpoint import megatron_optimizer, torch_dist
from megagrow.checkpoint.layout import (
    TORCH,
    TORCH_DIST,
    checkpoint_format,
    read_tracker,
    save_checkpoint,
    save_iteration,
    shard_path,
)
from megagrow.checkpoint.megatron_args import build_args, config_record
from megagrow.checkpoint.megatron_state import (
    MEGAGROW_KEY,
    restore_rng,
    rng_state,
    scheduler_state,
    shard_file,
    with_extra_states,
)
from megagrow.checkpoint.optimizer_layout import (
    EXP_AVG,
    EXP_AVG_SQ,
    MASTER,
    STATE_KINDS,
    dist_state_key,
    megatron_optimizer_common,
    megatron_param_groups,
    param_state,
    stage_record,
)
from megagrow.checkpoint.reader import MEGAGROW, MEGAGROW_V1, MEGATRON, CheckpointReader, RankShard
from megagrow.checkpoint.reshard import stage_shard
from megagrow.config import TrainConfig
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.parallel.pipeline import partition_layers
from megagrow.training.lr_schedule import weight_decay

logger = logging.getLogger("megagrow.training")
# Model fields that may differ between a checkpoint and the run loading it.
_COMPATIBLE_MODEL_FIELDS = {"params_dtype", "seq_length", "max_position_embeddings", "init_method_std"}


def metrics_path(train: TrainConfig) -> Path:
    """JSONL metrics file: --metrics-file, else beside the checkpoints, else runs/metrics.jsonl."""
    if train.metrics_file:
        return Path(train.metrics_file)
    return Path(train.save) / "metrics.jsonl" if train.save else Path("runs") / "metrics.jsonl"


# ------------------------------------------------------------------------------------- saving


def _megagrow_record(trainer, optimizer: dict | None = None) -> dict:
    optimization = trainer.optimization
    record = {"config": config_record(trainer.model_config, trainer.parallel, trainer.train),
              "progress": asdict(trainer.progress)}
    record["scheduler"] = optimization.scheduler.state_dict()
    if getattr(trainer, "growth_record", None):
        record["growth"] = trainer.growth_record
    if optimizer is not None:
        record["optimizer"] = optimizer
    return record


def _optimizer_record(trainer) -> dict | None:
    """The stage's model-space optimizer record, unless --no-save-optim (collective over dp: every rank calls it)."""
    return None if trainer.train.no_save_optim else trainer.optimization.optimizer_record()


def _megatron_entries(trainer) -> dict:
    train = trainer.train
    args = build_args(trainer.model_config, trainer.parallel, ckpt_format=train.ckpt_format, train=train,
                      consumed_train_samples=trainer.progress.consumed_samples)
    entries = {"args": args, "rng": None if train.no_save_rng else rng_state(train.seed, state.tp_rank(), state.pp_rank())}
    optimization = trainer.optimization
    schedule = asdict(optimization.scheduler.config)
    entries["scheduler"] = scheduler_state(optimization.scheduler.num_steps, schedule)
    return entries


def save(trainer) -> None:
    """Collectively save the trainer's state at its current iteration to --save."""
    root, iteration = trainer.train.save, trainer.progress.iteration
    if trainer.train.ckpt_format == TORCH_DIST:
        _save_torch_dist(trainer)
    else:
        _save_torch(trainer)
    logger.info("saved checkpoint %s at iteration %d (%s)", root, iteration, trainer.train.ckpt_format)


def _stage_state(weights: dict, trainer) -> dict:
    model = trainer.model
    return with_extra_states(weights, len(model.decoder.layers), model.post_process)


def _node_id() -> str:
    # torchrun numbers the nodes (GROUP_RANK); other launchers leave the host name.
    return os.environ.get("GROUP_RANK") or socket.gethostname()


def _writes_shard(own_copy: bool) -> bool:
    """dp rank 0 writes each (tp, pp) shard; a node keeping its own copy also writes its lowest replica's (collective)."""
    mine = (_node_id(), state.tp_rank(), state.pp_rank(), state.dp_rank())
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if state.dp_rank() == 0:
        return True
    replicas_here = [dp for node, tp, pp, dp in everyone if (node, tp, pp) == mine[:3]]
    return own_copy and state.dp_rank() == min(replicas_here)


def _save_torch(trainer) -> None:
    # Both are collective over dp (the distributed optimizer's slices, DeepSpeed's partitions).
    weights, optimizer = trainer.optimization.stage_weights(), _optimizer_record(trainer)
    megatron = _megatron_entries(trainer)
    shard = shard_file(_stage_state(weights, trainer), args=megatron["args"], iteration=trainer.progress.iteration,
                       megagrow=_megagrow_record(trainer, optimizer), rng=megatron["rng"],
                       scheduler=megatron.get("scheduler"), flops_so_far=trainer.progress.consumed_flops)
    save_checkpoint(trainer.train.save, trainer.progress.iteration, shard, tp_rank=state.tp_rank(),
                    pp_rank=state.pp_rank(), pp_size=state.pp_size(), writes=_writes_shard)


def _optimizer_entries(optimizer: dict, where: dict) -> list:
    """torch_dist chunks of a stage's model-space optimizer state (masters only where they are not the weights)."""
    entries = []
    for kind in STATE_KINDS:
        tensors = {name: record[kind] for name, record in optimizer["params"].items() if record[kind] is not None}
        entries += torch_dist.stage_entries([tensors], prefix=dist_state_key(kind, ""), extra_states=False, **where)
    return entries


def _megatron_param_groups(trainer, step: int) -> list[dict]:
    train, scheduler = trainer.train, trainer.optimization.scheduler
    return megatron_param_groups(lr=scheduler.get_lr(), max_lr=train.lr, min_lr=train.min_lr,
                                 weight_decay=weight_decay(scheduler.config, scheduler.num_steps),
                                 betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps, step=step)


def _save_torch_dist(trainer) -> None:
    model, train = trainer.model, trainer.train
    megatron = _megatron_entries(trainer)
    weights, optimizer = trainer.optimization.stage_weights(), _optimizer_record(trainer)

    def write(tmp_dir: Path, own_copy: bool) -> None:
        if not _all_ranks_agree(not own_copy):  # refused on every rank at once: no rank left waiting
            raise UserError(f"--save {train.save}: a node does not see the directory rank 0 writes to, and "
                            f"--ckpt-format torch_dist needs a filesystem every node shares; use --ckpt-format torch "
                            f"on node-local disks")
        entries = []
        if state.dp_rank() == 0:
            layers = range(model.layer_offset, model.layer_offset + len(model.decoder.layers))
            tied_copy = model.post_process and not model.pre_process and trainer.model_config.tie_embeddings
            where = dict(tp_rank=state.tp_rank(), tp=state.tp_size(), layers=layers,
                         num_layers=trainer.model_config.num_layers, tied_head_copy=tied_copy)
            entries = list(torch_dist.stage_entries([weights], **where))
            if optimizer is not None:
                entries += _optimizer_entries(optimizer, where)
            if megatron["rng"] is not None:
                key = torch_dist.object_key("rng_state", (state.pp_rank(), state.tp_rank()),
                                            (state.pp_size(), state.tp_size()))
                entries.append(torch_dist.ObjectEntry(key, megatron["rng"]))
        rank = dist.get_rank() if dist.is_initialized() else 0
        records = torch_dist.write_rank_file(tmp_dir, rank, entries) if entries else []
        gathered = [records]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)  # every writer's chunk locations, for the metadata
        steps = None if optimizer is None else {
            "step": max((r["step"] for r in optimizer["params"].values()), default=0),
            "loss_scaler": optimizer["loss_scaler"]}
        common = {"args": megatron["args"], "checkpoint_version": 3.0, "iteration": trainer.progress.iteration,
                  "opt_param_scheduler": megatron.get("scheduler"),
                  "num_floating_point_operations_so_far": trainer.progress.consumed_flops,
                  MEGAGROW_KEY: {"format_version": 2, **_megagrow_record(trainer, steps)}}
        if steps is not None:  # what megatron-core's optimizer reads beside the state tensors
            common["optimizer"] = megatron_optimizer_common(steps["step"], _megatron_param_groups(trainer, steps["step"]),
                                                            mixed_precision=train.precision != "fp32")
        if rank == 0:
            torch_dist.write_metadata(tmp_dir, [r for rank_records in gathered for r in rank_records], common)

    save_iteration(train.save, trainer.progress.iteration, write)


# ------------------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    """What phase 1 read, for phase 2: this rank's own file (`shard`, when the layout is the run's) or the whole
    checkpoint (`reader`, read in another layout or format)."""

    source: RankShard | CheckpointReader

    @property
    def same_layout(self) -> bool:
        """Saved with this run's tp, pp and layer split, in the torch format: this rank's file is its state."""
        return isinstance(self.source, RankShard)


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
    """Whether root is in DeepSpeed's own format (it holds DeepSpeed's 'latest' tag file)."""
    return (Path(root) / "latest").is_file()


def refuse_deepspeed_format(root) -> None:
    """Stop in one line on a checkpoint in DeepSpeed's own format: its engine would unpickle the files whole."""
    # megagrow's DeepSpeed runs save megagrow's format; DeepSpeed's own is read only by the converter,
    # with the same allowlist as every other load.
    if is_deepspeed_checkpoint(root):
        raise UserError(f"--load {root} is in DeepSpeed's own checkpoint format, which megagrow does not let DeepSpeed "
                        f"load (its files are unpickled whole); convert it once with "
                        f"python tools/convert_deepspeed_checkpoint.py --load {root} --save NEW_DIR")


def _run_layers_per_stage(trainer) -> list[int]:
    ranges = partition_layers(trainer.model_config.num_layers, trainer.parallel.pp, trainer.train.pipeline_layer_split)
    return [len(r) for r in ranges]


def load_weights(trainer) -> LoadedCheckpoint | None:
    """Phase 1, before the optimizer exists: put the checkpoint's weights into this rank's stage.

    Returns what phase 2 needs, or None (no checkpoint yet).
    """
    root, train = trainer.train.load, trainer.train
    iteration = read_tracker(root)
    if iteration is None:  # (--exit-on-missing-checkpoint stopped the run earlier, in pretrain_gpt.py)
        # info, printed by rank 0 alone: a first launch with --load = --save is the normal case
        logger.info("--load %s holds no checkpoint yet; training from scratch", root)
        return None
    refuse_deepspeed_format(root)
    own = _own_shard(trainer, root, iteration)
    if own is not None:
        source, weights = own, own.model
    else:
        source = CheckpointReader(root, iteration, vocab_size=trainer.model_config.vocab_size)
    _refuse_v1(source, root)
    check_model_config(asdict(source.config), asdict(trainer.model_config), str(root))
    model = trainer.model
    if own is None:
        layers = range(model.layer_offset, model.layer_offset + len(model.decoder.layers))
        weights = stage_shard(source.config, source.read_group, layers, tp=state.tp_size(), tp_rank=state.tp_rank(),
                              first=model.pre_process, last=model.post_process)
        logger.info("loading %s (%s, tp=%d pp=%d) into this run's tp=%d pp=%d layout", root, source.format,
                    source.tp, source.pp, state.tp_size(), state.pp_size())
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"--load {root}: tensors do not match this stage (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); was it saved with another --pipeline-layer-split?")
    return LoadedCheckpoint(source)


def _refuse_v1(source, root) -> None:
    if source.origin == MEGAGROW_V1:
        raise UserError(f"--load {root}: written by an older megagrow (its own weight names); convert it once with "
                        f"python tools/convert_checkpoint.py upgrade --load {root} --save NEW_DIR")


def _own_shard(trainer, root, iteration) -> RankShard | None:
    """This rank's file when every rank finds its own, saved in the run's layout; None otherwise (read it whole)."""
    own = None
    try:
        if checkpoint_format(root, iteration) == TORCH:
            path = shard_path(root, iteration, state.tp_rank(), state.pp_rank(), state.pp_size())
            if path.is_file():
                candidate = RankShard(root, iteration, state.tp_rank(), state.pp_rank(), state.pp_size(),
                                      vocab_size=trainer.model_config.vocab_size)
                stage_layers = _run_layers_per_stage(trainer)[state.pp_rank()]
                fits = candidate.recorded_layout() == (state.tp_size(), state.pp_size())
                own = candidate if fits and candidate.num_layers == stage_layers else None
    finally:
        agreed = _all_ranks_agree(own is not None)  # every rank takes the same path, or none may
    return own if agreed else None


def _all_ranks_agree(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                         else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def load_training_state(trainer, loaded: LoadedCheckpoint | None) -> None:
    """Phase 2, with the optimizer built: progress, LR schedule, RNG and optimizer (or the engine's checkpoint)."""
    root, train = trainer.train.load, trainer.train
    if loaded is None:
        return
    reader = loaded.source
    position = reader.run_position()
    if position is None:
        logger.info("loaded model weights from %s; starting a new run at iteration 0", root)
        return
    if not train.no_load_optim:
        _load_optimizer(trainer, loaded)
    _restore(trainer, position.progress, position.scheduler_steps, _saved_rng(loaded))


def _saved_rng(loaded: LoadedCheckpoint):
    source = loaded.source
    if loaded.same_layout:
        return source.file.get("rng_state")
    if source.format == TORCH_DIST:
        key = torch_dist.object_key("rng_state", (state.pp_rank(), state.tp_rank()), (source.pp, source.tp))
        return source.torch_dist.read_object(key) if key in source.torch_dist else None
    return None  # another layout's ranks drew from other streams


def _load_optimizer(trainer, loaded: LoadedCheckpoint) -> None:
    source, root = loaded.source, trainer.train.load
    if source.origin != MEGAGROW:
        record = _megatron_optimizer_record(trainer, loaded)
        if record is not None:
            _load_record(trainer, record, root)
            return
        if source.has_buffer_layout_optimizer_state:
            raise UserError(f"--load {root}: its Adam state is Megatron-LM's distributed optimizer in gradient-buffer "
                            f"layout (distrib_optim.pt, or torch_dist dp_reshardable), which megagrow does not read; "
                            f"save it from Megatron-LM with --ckpt-format torch_dist "
                            f"--dist-ckpt-optim-fully-reshardable, or pass --no-load-optim (Adam moments restart)")
        if source.format == TORCH_DIST or (
                source.file if loaded.same_layout else source.shard_file(0, 0)).get("optimizer") is not None:
            raise UserError(f"--load {root}: its optimizer record holds no per-parameter Adam state megagrow can read; "
                            f"pass --no-load-optim (weights, iteration, data position and LR schedule carry over, "
                            f"Adam moments restart)")
        return
    if loaded.same_layout:
        record = source.file[MEGAGROW_KEY].get("optimizer", _MISSING)
    elif source.has_optimizer_state:
        record = _optimizer_record_from(source, trainer)
    else:
        record = source.common[MEGAGROW_KEY].get("optimizer", _MISSING) if source.format == TORCH else _MISSING
    if record is None:
        logger.info("%s asks for a fresh optimizer (grown from a Megatron-LM checkpoint)", root)
        return
    if record is _MISSING or not record.get("params"):
        raise UserError(f"--load {root}: the checkpoint holds no optimizer state (saved with --no-save-optim?); pass "
                        f"--no-load-optim to start the optimizer afresh")
    _load_record(trainer, record, root)


def _load_record(trainer, record: dict, root: str) -> None:
    try:
        trainer.optimization.load_optimizer_record(record)
    except UserError as err:
        raise UserError(f"--load {root}: {err}") from None


_MISSING = object()


def _megatron_optimizer_record(trainer, loaded: LoadedCheckpoint) -> dict | None:
    """This rank's Adam state from a Megatron-LM checkpoint (its non-distributed optimizer's, in either format, or
    its fully reshardable distributed one's), or None where it holds none megagrow reads."""
    source = loaded.source
    if not loaded.same_layout:
        return _optimizer_record_from(source, trainer) if source.has_optimizer_state else None
    if source.origin != MEGATRON or not megatron_optimizer.holds_adam_state(source.file.get("optimizer")):
        return None
    return stage_record(megatron_optimizer.adam_state_by_name(source.file["optimizer"], source.model,
                                                              str(source.path.parent)), None)


def _optimizer_record_from(reader: CheckpointReader, trainer) -> dict:
    """This rank's model-space optimizer record, regrouped from a checkpoint of another layout or format."""
    model = trainer.model
    layers = range(model.layer_offset, model.layer_offset + len(model.decoder.layers))
    where = dict(tp=state.tp_size(), tp_rank=state.tp_rank(), first=model.pre_process, last=model.post_process)
    kinds = {kind: stage_shard(reader.config, reader.group_reader(kind), layers, **where) for kind in STATE_KINDS}
    step = reader.optimizer_steps()
    loss_scaler = (reader.common.get(MEGAGROW_KEY, {}).get("optimizer") or {}).get("loss_scaler")
    params = {name: param_state(kinds[EXP_AVG][name], kinds[EXP_AVG_SQ][name], kinds[MASTER][name], step)
              for name in kinds[EXP_AVG]}
    return stage_record(params, loss_scaler)


def _restore(trainer, progress: dict, scheduler_num_steps: int | None, rng) -> None:
    for name, value in progress.items():
        setattr(trainer.progress, name, value)
    if scheduler_num_steps is not None:
        trainer.optimization.scheduler.load_state_dict({"num_steps": scheduler_num_steps})
    if not trainer.train.no_load_rng and rng is not None:
        restore_rng(rng)
    logger.info("resumed from %s at iteration %d (%d samples consumed)", trainer.train.load, trainer.progress.iteration,
                trainer.progress.consumed_samples)
