"""megagrow's checkpoints from before it adopted megatron-core's names (format 1), read for a one-time upgrade.

A format-1 shard file held `checkpoint_version` 1, `model`, `config` (megagrow's configs as
dicts) and run state (`progress`, `scheduler`, `rng`, `optimizer`, `growth`). Its names
were megagrow's own, its layers numbered globally on every stage, and its fused QKV rows
were [Wq; Wk; Wv] per tp rank:

    embedding.weight                      -> embedding.word_embeddings.weight
    layers.N.input_norm.weight            -> decoder.layers.n.input_layernorm.weight
    layers.N.attention.qkv.weight         -> decoder.layers.n.self_attention.linear_qkv.weight
                                             (rows regrouped per query group)
    layers.N.attention.dense.weight       -> decoder.layers.n.self_attention.linear_proj.weight
    layers.N.post_attention_norm.weight   -> decoder.layers.n.pre_mlp_layernorm.weight
    layers.N.mlp.gate_up.weight           -> decoder.layers.n.mlp.linear_fc1.weight
    layers.N.mlp.down.weight              -> decoder.layers.n.mlp.linear_fc2.weight
    final_norm.weight                     -> decoder.final_layernorm.weight
    output_layer.weight                   -> output_layer.weight

(n = N minus the stage's first layer.) A tp rank's [Wq; Wk; Wv] rows cover whole query
groups, so each shard converts on its own: regrouping its rows gives exactly the new shard.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from megagrow.checkpoint import names
from megagrow.checkpoint.layout import (
    SHARD_FILENAME,
    Iteration,
    checkpoint_layout,
    read_tracker,
    save_iteration,
    shard_dir_name,
    shard_path,
    write_file_synced,
)
from megagrow.checkpoint.megatron_args import build_args
from megagrow.checkpoint.megatron_state import rng_state, scheduler_state, shard_file, with_extra_states
from megagrow.checkpoint.optimizer_layout import ADAM_MOMENTS, param_state, stage_record, uses_weight_decay
from megagrow.checkpoint.safe_load import load_file
from megagrow.checkpoint.tp_layout import interleave_qkv
from megagrow.config import ModelConfig, ParallelConfig
from megagrow.errors import UserError

V1_CHECKPOINT_VERSION = 1
_GLOBAL = {"embedding.weight": names.EMBEDDING, "final_norm.weight": names.FINAL_NORM,
           "output_layer.weight": names.OUTPUT_LAYER}
_LAYER = {"input_norm.weight": names.INPUT_NORM, "attention.qkv.weight": names.QKV,
          "attention.dense.weight": names.PROJ, "post_attention_norm.weight": names.PRE_MLP_NORM,
          "mlp.gate_up.weight": names.FC1, "mlp.down.weight": names.FC2}
_V1_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_v1_record(record: dict) -> bool:
    """Whether a shard file was written by megagrow's format 1."""
    config = record.get("config")
    return record.get("checkpoint_version") == V1_CHECKPOINT_VERSION and isinstance(config, dict) and "model" in config


def model_config(record: dict, where: str) -> ModelConfig:
    """The ModelConfig of a format-1 shard."""
    try:
        return ModelConfig(**record["config"]["model"])
    except TypeError as err:
        raise UserError(f"{where}: the config record does not describe a megagrow model ({err})") from None


def recorded_layout(record: dict) -> tuple[int, int]:
    """(tp, pp) a format-1 shard was saved with."""
    parallel = record["config"].get("parallel", {})
    return int(parallel.get("tp", 1)), int(parallel.get("pp", 1))


def regroup_qkv_shard(qkv: torch.Tensor, config: ModelConfig, tp: int) -> torch.Tensor:
    """A tp rank's format-1 [Wq; Wk; Wv] rows (or a moment of them) as megatron-core's per-group rows."""
    d = config.head_dim
    q_rows, kv_rows = config.num_attention_heads * d // tp, config.query_groups * d // tp
    q, k, v = qkv.split([q_rows, kv_rows, kv_rows])
    return interleave_qkv(q, k, v, config, groups=config.query_groups // tp)


def new_name(name: str, first_layer: int) -> str:
    """The megatron-core name of a format-1 parameter, layers renumbered from the stage's `first_layer`."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _V1_LAYER_NAME.match(name)
    if match is None or match.group(2) not in _LAYER:
        raise UserError(f"unknown parameter {name!r} in a format-1 megagrow checkpoint")
    return names.layer_param_name(int(match.group(1)) - first_layer, _LAYER[match.group(2)])


def first_layer(model: dict) -> int:
    """The lowest (global) layer number a format-1 stage holds."""
    numbers = [int(m.group(1)) for m in map(_V1_LAYER_NAME.match, model) if m]
    return min(numbers) if numbers else 0


def canonical_model_state(model: dict, config: ModelConfig, tp: int, where: str) -> dict[str, torch.Tensor]:
    """A format-1 stage state dict in megatron-core's names and layouts (layers numbered from 0)."""
    start = first_layer(model)
    converted = {}
    for name, tensor in model.items():
        target = new_name(name, start)
        converted[target] = regroup_qkv_shard(tensor, config, tp) if target.endswith(names.QKV) else tensor
    return converted


def _schedule_in_samples(old: dict, train: dict) -> dict:
    """A v1 schedule (counted in optimizer steps, weight decay constant) as megagrow's current one."""
    batch = int(train["global_batch_size"])
    decay = old["decay_steps"] * batch if old["decay_steps"] is not None else None
    return {"lr": old["lr"], "min_lr": old["min_lr"], "warmup_samples": old["warmup_steps"] * batch,
            "decay_samples": decay, "decay_style": old["decay_style"], "start_wd": train.get("weight_decay"),
            "end_wd": train.get("weight_decay"), "wd_incr_style": "constant",
            "wd_incr_samples": int(train.get("train_iters") or 0) * batch, "global_batch_size": batch}


def _rng_record(old: dict, seed: int, tp_rank: int, pp_rank: int) -> list[dict]:
    """Megatron's rng_state record from format 1's tensor-encoded Python / numpy / torch states."""
    record = rng_state(seed, tp_rank, pp_rank)  # its CUDA states: a fresh run's for this seed
    python, numpy = old["python"], old["numpy"]
    record[0]["random_rng_state"] = (python["version"], tuple(python["state"].tolist()), python["gauss"])
    record[0]["np_rng_state"] = (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                                 numpy["has_gauss"], numpy["gauss"])
    record[0]["torch_rng_state"] = old["torch"]
    return record


def adam_param_order(model: dict[str, torch.Tensor]) -> list[list[str]]:
    """Format 1's optimizer indexing: per weight-decay group (matrices, then vectors), parameters in reverse order."""
    fragments = list(reversed(list(model)))  # its gradient reducer bucketed parameters in reverse order
    decayed = [name for name in fragments if uses_weight_decay(model[name])]
    not_decayed = [name for name in fragments if not uses_weight_decay(model[name])]
    return [group for group in (decayed, not_decayed) if group]


def _upgrade_optimizer(optimizer: dict, model: dict[str, torch.Tensor], config: ModelConfig, tp: int) -> dict:
    """Format 1's index-keyed optimizer state as the current model-space record, linear_qkv rows regrouped."""
    order = [name for group in adam_param_order(model) for name in group]
    masters = dict(zip(reversed(list(model)), optimizer["masters"]))
    params = {}
    for index, name in enumerate(order):
        adam = optimizer["optimizer"]["state"].get(index)
        if adam is None:
            continue  # never stepped
        regroup = (lambda t: regroup_qkv_shard(t, config, tp)) if name.endswith(names.QKV) else (lambda t: t)
        master = masters[name]
        params[name] = param_state(*(regroup(adam[moment]) for moment in ADAM_MOMENTS),
                                   None if master is None else regroup(master.view_as(model[name])), int(adam["step"]))
    return stage_record(params, optimizer.get("loss_scaler"))


def upgrade_checkpoint(load: str | os.PathLike, save: str | os.PathLike, iteration: Iteration | None = None) -> Path:
    """Rewrite one iteration of a format-1 checkpoint in the current format, same layout, run state included."""
    iteration = read_tracker(load) if iteration is None else iteration
    if iteration is None:
        raise UserError(f"no checkpoint in {load}: latest_checkpointed_iteration.txt is missing (check --load)")
    tp, pp = checkpoint_layout(load, iteration)

    def write(tmp_dir: Path, _own_copy: bool) -> None:
        for p in range(pp):
            for t in range(tp):
                path = shard_path(load, iteration, t, p, pp)
                old = load_file(path)
                if not is_v1_record(old):
                    raise UserError(f"{path}: not a checkpoint of megagrow's format 1; nothing to upgrade (it loads as is)")
                config = model_config(old, str(path))
                model = canonical_model_state(old["model"], config, tp, str(path))
                megagrow = {"config": old["config"], **{k: old[k] for k in ("progress", "scheduler", "growth") if k in old}}
                if old.get("optimizer") is not None:
                    megagrow["optimizer"] = _upgrade_optimizer(old["optimizer"], model, config, tp)
                parallel = ParallelConfig(**old["config"].get("parallel", {"tp": tp, "pp": pp}))
                train = old["config"].get("train", {})
                progress = old.get("progress", {})
                args = build_args(config, parallel, ckpt_format="torch",
                                  consumed_train_samples=int(progress.get("consumed_samples", 0)))
                scheduler = None
                if "scheduler" in old and train:
                    scheduler = scheduler_state(old["scheduler"]["num_steps"],
                                                _schedule_in_samples(old["scheduler"]["config"], train))
                rng = _rng_record(old["rng"], int(train.get("seed", 1234)), t, p) if "rng" in old else None
                layers = len({names.split_layer_name(n)[0] for n in model if names.split_layer_name(n)})
                new = shard_file(with_extra_states(model, layers, p == pp - 1), args=args,
                                 iteration=int(progress.get("iteration", 0)), megagrow=megagrow, rng=rng,
                                 scheduler=scheduler)
                target = tmp_dir / shard_dir_name(t, p, pp) / SHARD_FILENAME
                target.parent.mkdir(parents=True, exist_ok=True)
                write_file_synced(target, new)
                if any(path.parent.glob("distrib_optim_dp*.pt")):
                    print(f"warning: {path.parent}: the distributed optimizer's state is not carried over (its flat "
                          f"slices cannot be regrouped); resume the upgraded checkpoint with --no-load-optim")

    return save_iteration(save, iteration, write, barrier=lambda: None, is_coordinator=lambda: True)
