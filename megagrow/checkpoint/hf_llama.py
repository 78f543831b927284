"""HF `LlamaForCausalLM` directories <-> megagrow full tensors: names, fused matrices, config.json.

Names (N = layer number; HF prefixes `model.` except for the head):

    embedding.word_embeddings.weight                   model.embed_tokens.weight
    decoder.layers.N.input_layernorm.weight            model.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.weight  q_proj, k_proj, v_proj of model.layers.N.self_attn,
                                                       rows regrouped per query group
    decoder.layers.N.self_attention.linear_proj.weight model.layers.N.self_attn.o_proj.weight
    decoder.layers.N.pre_mlp_layernorm.weight          model.layers.N.post_attention_layernorm.weight
    decoder.layers.N.mlp.linear_fc1.weight             [gate_proj; up_proj] of model.layers.N.mlp
    decoder.layers.N.mlp.linear_fc2.weight             model.layers.N.mlp.down_proj.weight
    decoder.final_layernorm.weight                     model.norm.weight
    output_layer.weight                                lm_head.weight (absent when the embeddings are tied)

linear_qkv interleaves HF's q, k and v rows per query group (tp_layout.interleave_qkv);
within a head the rows are HF's, since query head i reads kv head i // (heads / kv_heads) in
both codebases and both use rotate-half RoPE. linear_fc1 stacks gate_proj and up_proj. Weights are read
and written as safetensors only, which cannot carry code. An HF model that megagrow cannot
represent exactly (scaled RoPE, biases, a decoupled head_dim) is refused, not approximated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megagrow.checkpoint import names as megatron_names
from megagrow.checkpoint.reader import Group, GroupReader, group_keys, group_param_names
from megagrow.checkpoint.tp_layout import interleave_qkv, parse_layer_param, split_qkv, tp_split
from megagrow.config import ModelConfig
from megagrow.errors import UserError

CONFIG_FILENAME = "config.json"
SAFETENSORS_FILENAME = "model.safetensors"
SAFETENSORS_INDEX_FILENAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_LAYER_NAMES = {
    megatron_names.INPUT_NORM: ("input_layernorm.weight",),
    megatron_names.QKV: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    megatron_names.PROJ: ("self_attn.o_proj.weight",),
    megatron_names.PRE_MLP_NORM: ("post_attention_layernorm.weight",),
    megatron_names.FC1: ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    megatron_names.FC2: ("mlp.down_proj.weight",),
}
_GLOBAL_NAMES = {
    megatron_names.EMBEDDING: ("model.embed_tokens.weight",),
    megatron_names.FINAL_NORM: ("model.norm.weight",),
    megatron_names.OUTPUT_LAYER: ("lm_head.weight",),
}
_REQUIRED_HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_names(name: str, config: ModelConfig) -> tuple[str, ...]:
    """HF tensor names that make up megagrow parameter `name`, in the order they are stacked."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer, suffix = parse_layer_param(name)
    return tuple(f"model.layers.{layer}.{hf_suffix}" for hf_suffix in _LAYER_NAMES[suffix])


def _is_qkv(name: str) -> bool:
    return name.endswith(megatron_names.QKV)


def to_hf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors for a dict of megagrow full tensors (fused matrices split back into HF's)."""
    converted = {}
    for name, full in tensors.items():
        names = hf_names(name, config)
        if _is_qkv(name):
            pieces = split_qkv(full, config)
        elif len(names) > 1:  # linear_fc1: [gate; up], its tp blocks
            pieces = full.split(list(tp_split(name, config).block_sizes))
        else:
            pieces = (full,)
        # Own storage for each: safetensors refuses tensors that share memory.
        converted.update({hf_name: piece.contiguous().clone() for hf_name, piece in zip(names, pieces)})
    return converted


def _refuse(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}, which megagrow's Llama cannot represent; only plain Llama models convert")


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    # transformers < 5 writes rope_theta and rope_scaling; 5.x writes rope_parameters.
    parameters = hf.get("rope_parameters")
    if isinstance(parameters, dict):
        if parameters.get("rope_type", "default") != "default":
            raise _refuse(where, f"rope_parameters.rope_type is {parameters.get('rope_type')!r}")
        return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if hf.get("rope_scaling"):
        raise _refuse(where, f"rope_scaling is {hf['rope_scaling']!r}")
    return float(hf.get("rope_theta", 10000.0))


def config_from_hf(hf: dict[str, Any], where: str, *, seq_length: int | None = None,
                   make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The ModelConfig of an HF Llama config.json (dict); UserError for what megagrow cannot represent."""
    if hf.get("model_type") != "llama":
        raise _refuse(where, f"model_type is {hf.get('model_type')!r}, not 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _refuse(where, f"{flag} is true")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, f"hidden_act is {hf['hidden_act']!r}, not 'silu'")
    missing = [key for key in _REQUIRED_HF_KEYS if key not in hf]
    if missing:
        raise UserError(f"{where}: {', '.join(missing)} missing; this is not a complete Llama config")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise _refuse(where, f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                             f"= {hidden // heads}")
    max_positions = hf.get("max_position_embeddings", 2048)
    # transformers 5.x names the weights' dtype `dtype`, earlier versions `torch_dtype`.
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"], seq_length=seq_length or max_positions, max_position_embeddings=max_positions,
        rope_theta=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=dtype if dtype in _DTYPE_NAMES.values() else "float32")


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """HF config.json content for a megagrow model whose weights are stored in `dtype`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.query_groups,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_positions,
        "rms_norm_eps": config.norm_eps,
        # Both spellings, so transformers 4.x and 5.x read the same plain RoPE.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_method_std,
        # `dtype` for transformers 5.x, `torch_dtype` for earlier versions.
        "dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); re-save the model") from None


class HFCheckpointReader:
    """An HF Llama directory (config.json + safetensors, single or sharded) read as megagrow full tensors."""

    def __init__(self, directory: str | os.PathLike, *, seq_length: int | None = None,
                 make_vocab_size_divisible_by: int = 128):
        from safetensors import safe_open

        self.directory = Path(directory)
        config_path = self.directory / CONFIG_FILENAME
        if not self.directory.is_dir():
            raise UserError(f"HF model directory not found: {self.directory} (check --load)")
        if not config_path.is_file():
            raise UserError(f"{config_path} not found; --load must be an HF model directory saved by save_pretrained")
        self.config = config_from_hf(_read_json(config_path), str(config_path), seq_length=seq_length,
                                     make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        self._file_of = self._weight_map()
        self._files = {file: safe_open(str(self.directory / file), framework="pt")
                       for file in sorted(set(self._file_of.values()))}
        self._check_names()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / SAFETENSORS_INDEX_FILENAME
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise UserError(f"{index} names {missing[0]}, which is not in {self.directory}; the download is "
                                f"incomplete")
            return weight_map
        single = self.directory / SAFETENSORS_FILENAME
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                return {key: SAFETENSORS_FILENAME for key in f.keys()}
        raise UserError(f"{self.directory}: no {SAFETENSORS_FILENAME} or {SAFETENSORS_INDEX_FILENAME}; only "
                        f"safetensors weights are read (re-save with save_pretrained(safe_serialization=True))")

    def _check_names(self) -> None:
        expected = {hf for group in group_keys(self.config) for name in group_param_names(group, self.config)
                    for hf in hf_names(name, self.config)}
        if self.config.tie_embeddings:
            expected.add("lm_head.weight")  # some writers keep the tied copy
        # Old checkpoints store RoPE frequencies; megagrow recomputes them from rope_theta.
        unexpected = sorted(k for k in self._file_of if k not in expected and not k.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise _refuse(str(self.directory), f"the weights include {unexpected[0]} (and {len(unexpected) - 1} more "
                                               f"unexpected tensors)")

    def _tensor(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self._file_of:
            raise UserError(f"{self.directory}: tensor {hf_name} is missing from the weights; the model is incomplete")
        return self._files[self._file_of[hf_name]].get_tensor(hf_name)

    def read_group(self, group: Group) -> dict[str, torch.Tensor]:
        """Full megagrow tensors of one group (fused matrices stacked from HF's)."""
        tensors = {}
        for name in group_param_names(group, self.config):
            pieces = [self._tensor(hf_name) for hf_name in hf_names(name, self.config)]
            if _is_qkv(name):
                tensors[name] = interleave_qkv(*pieces, self.config)
            else:
                tensors[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return tensors


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_FILENAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def save_hf(directory: str | os.PathLike, config: ModelConfig, read_group: GroupReader, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write an HF LlamaForCausalLM directory (config.json + safetensors) from a group reader, atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not empty; choose a new --save directory")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Tensors are gathered a group at a time into files of at most max_shard_bytes; the
    # files get their final `-of-N` names once N is known.
    files: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes, dtype = 0, 0, None

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(tmp / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(sorted(pending))
            pending, pending_bytes = {}, 0

    # disable=None: a bar on a terminal, none in a log file (tqdm checks isatty)
    for group in tqdm(group_keys(config), desc="writing HF weights", unit="group", disable=None if progress else True):
        tensors = to_hf_tensors(read_group(group), config)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending.update(tensors)
        pending_bytes += size
        total_bytes += size
        dtype = dtype or next(iter(tensors.values())).dtype
    flush()
    names = _shard_names(len(files))
    for i, name in enumerate(names):
        os.replace(tmp / f"part-{i:05d}.safetensors", tmp / name)
    if len(names) > 1:
        weight_map = {key: name for name, keys in zip(names, files) for key in keys}
        (tmp / SAFETENSORS_INDEX_FILENAME).write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / CONFIG_FILENAME).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    if directory.exists():
        directory.rmdir()  # empty, checked above
    os.replace(tmp, directory)
    return directory
