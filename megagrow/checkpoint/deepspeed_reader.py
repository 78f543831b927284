"""Read a DeepSpeed-format checkpoint written by megagrow's DeepSpeed backend before it saved megagrow's own
format (any ZeRO stage), as full, unsharded tensors in megatron-core's names.

DeepSpeed's layout under `{root}/{tag}/` for a run with model-parallel ranks
mp = pp_rank * tp + tp_rank (megagrow.parallel.state.mp_rank):

    ZeRO 0-2   mp_rank_MM_model_states.pt            "module": this (tp, pp) shard's weights
    ZeRO 3     zero_pp_rank_D_mp_rank_MM_model_states.pt   "module" holds empty placeholders;
               zero_pp_rank_D_mp_rank_MM_optim_states.pt   fp32 partitions: every parameter is
               cut into dp pieces of ceil(numel / dp) elements, and rank D's flat group is the
               concatenation of its piece of each parameter, in "param_shapes" order

megagrow's DeepSpeed backend also gathers ZeRO-3 weights at save time into a plain state
dict per model-parallel rank (megagrow_model_mp_rank_MM.pt), which is read when present;
otherwise ZeRO-3 weights are rebuilt from the fp32 master partitions. ZeRO 0-2 weights
come from the module weights (in the training dtype). The run's config travels in the client
state; the weights carry megagrow's format-1 names (megagrow_v1.py), renamed on reading. Every file is read through
safe_load (DeepSpeed's enum and loss-scaler records become plain stand-ins); anything else
is refused (some Python versions pickle the enum through getattr, which is refused too:
such checkpoints need the gathered file).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from megagrow.checkpoint import megagrow_v1, names
from megagrow.checkpoint.safe_load import load_file
from megagrow.checkpoint.tp_layout import merge_from_tp
from megagrow.config import ModelConfig
from megagrow.errors import UserError

_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def _load(path: Path) -> dict:
    return load_file(path, mmap=True)


_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def latest_tag(root: str | os.PathLike) -> str:
    """The tag DeepSpeed's `latest` file names under root: a plain directory name there, or a one-line refusal."""
    latest = Path(root) / "latest"
    if not latest.is_file():
        raise UserError(f"{root}: no DeepSpeed 'latest' file; pass --tag or check --load")
    try:
        tag = latest.read_bytes()[:256].decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{latest}: not a DeepSpeed tag file ({type(err).__name__}); it should hold one tag such as "
                        f"iter_0000100: fix or delete it") from None
    if not _TAG.match(tag) or tag in (".", ".."):
        raise UserError(f"{latest}: {tag[:40]!r} is not a checkpoint tag (a directory name beside the file, e.g. "
                        f"iter_0000100); fix or delete it")
    if not (Path(root) / tag).is_dir():
        raise UserError(f"{latest}: names tag {tag!r} but {Path(root) / tag} does not exist; the checkpoint is "
                        f"incomplete (fix the file to name a complete tag)")
    return tag


def read_deepspeed_checkpoint(root: str | os.PathLike, tag: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """(model config, full state dict, iteration) of a DeepSpeed checkpoint written by megagrow."""
    tag = tag or latest_tag(root)
    directory = Path(root) / tag
    if not directory.is_dir():
        raise UserError(f"DeepSpeed checkpoint directory not found: {directory}")
    files: dict[int, dict[int, Path]] = {}  # mp rank -> dp rank -> model-states file
    for entry in directory.iterdir():
        match = _MODEL_STATES.match(entry.name)
        if match:
            files.setdefault(int(match.group(2)), {})[int(match.group(1) or 0)] = entry
    if not files:
        raise UserError(f"{directory}: no *model_states.pt files; not a DeepSpeed checkpoint")
    first = _load(next(iter(files[min(files)].values())))
    if not megagrow_v1.is_v1_record(first):
        raise UserError(f"{directory}: no megagrow config in the client state; only DeepSpeed checkpoints written by "
                        f"megagrow's pretrain_gpt.py --deepspeed can be converted")
    config = megagrow_v1.model_config(first, str(directory))
    tp, pp = megagrow_v1.recorded_layout(first)
    if sorted(files) != list(range(tp * pp)):
        raise UserError(f"{directory}: model-parallel ranks {sorted(files)} do not match tp={tp} x pp={pp}; "
                        f"the checkpoint is incomplete")
    iteration = int(first.get("progress", {}).get("iteration", 0))
    shards = {mp: megagrow_v1.canonical_model_state(_mp_rank_weights(directory, mp, files[mp]), config, tp,
                                                    str(directory))
              for mp in range(tp * pp)}
    return config, _merge(shards, config, tp, pp), iteration


def gathered_weights_file(mp_rank: int) -> str:
    """Name of the plain state dict the DeepSpeed backend writes beside a ZeRO-3 checkpoint."""
    return f"megagrow_model_mp_rank_{mp_rank:02d}.pt"


def unflatten_zero3_partitions(partitions: list[list[torch.Tensor]], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from every dp rank's flat groups (partitions[rank][group]) and the groups' shapes."""
    dp = len(partitions)
    weights = {}
    for group, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / dp)
            full = torch.cat([partitions[rank][group][offset : offset + piece] for rank in range(dp)])
            weights[name] = full[:numel].view(tuple(shape))
            offset += piece
    return weights


def _mp_rank_weights(directory: Path, mp: int, by_dp: dict[int, Path]) -> dict[str, torch.Tensor]:
    states = _load(by_dp[min(by_dp)])
    module = states["module"]
    if not any(t.numel() == 0 for t in module.values()):
        return dict(module)  # ZeRO 0-2: the module weights are whole
    gathered = directory / gathered_weights_file(mp)
    if gathered.is_file():  # written by megagrow's DeepSpeed backend: plain tensors
        return _load(gathered)
    dp = int(states["dp_world_size"])
    partitions = []
    for rank in range(dp):
        path = directory / f"zero_pp_rank_{rank}_mp_rank_{mp:02d}_optim_states.pt"
        if not path.is_file():
            raise UserError(f"{path}: missing; ZeRO-3 weights need every data-parallel rank's optimizer file")
        partitions.append(_load(path)["optimizer_state_dict"]["fp32_flat_groups"])
    weights = unflatten_zero3_partitions(partitions, states["param_shapes"])
    return {name: tensor.to(module[name].dtype) for name, tensor in weights.items()}


def _merge(shards: dict[int, dict[str, torch.Tensor]], config: ModelConfig, tp: int, pp: int) -> dict[str, torch.Tensor]:
    full, offset = {}, 0
    for stage in range(pp):
        stage_shards = [shards[stage * tp + t] for t in range(tp)]
        layers = set()
        for name in stage_shards[0]:
            if name == names.OUTPUT_LAYER and config.tie_embeddings:
                continue  # the last stage's copy of the tied embedding
            parsed = names.split_layer_name(name)
            if parsed is not None:
                layers.add(parsed[0])
            global_name = names.renumber_layers({name: None}, offset).popitem()[0]
            full[global_name] = merge_from_tp(global_name, [shard[name] for shard in stage_shards], config)
        offset += len(layers)
    return full
