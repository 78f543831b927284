"""Megatron-LM's `torch_dist` checkpoint format: a torch.distributed.checkpoint directory, read and written.

One iteration directory holds

    .metadata        torch.distributed.checkpoint's Metadata (pickled torch dataclasses): for
                     every key its global shape and dtype and the chunks it was saved in, and
                     for every chunk the file, offset and length of its bytes
    __R_0.distcp     the chunks writer R saved: each tensor chunk a torch.save blob, each
                     object a torch.save'd byte string
    common.pt        what is not sharded: args, iteration, checkpoint_version,
                     opt_param_scheduler (and megagrow's own record)
    metadata.json    {"sharded_backend": "torch_dist", ...}

Keys are megatron-core's sharded keys, independent of the layout: `embedding.word_embeddings.weight`
[padded_vocab, h], `decoder.final_layernorm.weight`, `output_layer.weight`, and every layer
parameter stacked along a leading layer dimension, norms under their Transformer Engine
names (`decoder.layers.self_attention.linear_qkv.layer_norm_weight` [L, h]). linear_fc1 is
[L, 2 ffn, h] with all gate rows before all up rows, whatever the tp size. Objects (the RNG
record, the local spec's `_extra_state`) are keyed `{key}/shard_{offset}_{shape}`.

Reading never unpickles anything but torch's metadata classes and tensors (safe_load), and
reads only the chunks a request overlaps, so a tool can stream a model layer by layer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.distributed.checkpoint import metadata as dcp

from megagrow.checkpoint import names
from megagrow.checkpoint.safe_load import load_bytes, load_dcp_metadata, load_file
from megagrow.errors import UserError

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                  "common_backend_version": 1}


@dataclasses.dataclass
class TensorChunk:
    """One rectangular piece of a global tensor: its key, the global shape, where it sits, and its values."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor


@dataclasses.dataclass
class ObjectEntry:
    """One saved object (torch.save'd), keyed `{key}/shard_{offset}_{shape}` as megatron-core's ShardedObject."""

    unique_key: str
    value: Any


def object_key(key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """megatron-core's unique key of a sharded object at `offsets` of a grid of `shape`."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


# ------------------------------------------------------------------------------------- reading


class _FileSlice(io.RawIOBase):
    """A seekable read-only window [start, start + length) of an open file, for torch.load of one chunk."""

    def __init__(self, file, start: int, length: int):
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        read = self._file.readinto(memoryview(buffer)[:count])
        self._pos += read
        return read


class TorchDistReader:
    """The tensors, objects and common state of one torch_dist iteration directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.metadata = load_dcp_metadata(self.directory / METADATA_FILE)
        self._storage = {(index.fqn, tuple(index.offset) if index.offset is not None else None): info
                         for index, info in self.metadata.storage_data.items()}
        common = self.directory / COMMON_FILE
        self.common: dict = load_file(common) if common.is_file() else {}
        if not isinstance(self.common, dict):
            raise UserError(f"{common}: expected a dict of common state, found {type(self.common).__name__}")

    def __contains__(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    @property
    def keys(self) -> list[str]:
        """Every key of the checkpoint (tensors and objects)."""
        return list(self.metadata.state_dict_metadata)

    def _tensor_metadata(self, key: str) -> dcp.TensorStorageMetadata:
        entry = self.metadata.state_dict_metadata.get(key)
        if not isinstance(entry, dcp.TensorStorageMetadata):
            raise UserError(f"{self.directory}: no tensor {key!r} in the checkpoint; it is incomplete or holds "
                            f"another model")
        return entry

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of tensor `key`."""
        return tuple(self._tensor_metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        """Saved dtype of tensor `key`."""
        return self._tensor_metadata(key).properties.dtype

    def _load_chunk(self, key: str, offsets: tuple[int, ...]) -> torch.Tensor:
        info = self._storage.get((key, offsets))
        if info is None:
            raise UserError(f"{self.directory}: chunk {offsets} of {key} has no storage entry; the .metadata is damaged")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{self.directory}: {key} is stored with transforms {info.transform_descriptors}; "
                            f"megagrow reads uncompressed torch_dist checkpoints only")
        path = self.directory / info.relative_path
        try:
            with open(path, "rb") as f:
                return torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length)), map_location="cpu",
                                  weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{path}: missing; the torch_dist checkpoint is incomplete") from None
        except Exception as err:  # noqa: BLE001 - a damaged chunk ends in one line
            raise UserError(f"{path}: chunk of {key} cannot be loaded ({str(err).splitlines()[0][:160]}); the file is "
                            f"damaged or truncated") from None

    def read(self, key: str, start: Iterable[int] | None = None, size: Iterable[int] | None = None) -> torch.Tensor:
        """The region [start, start + size) of tensor `key` (the whole tensor by default), from the chunks it overlaps."""
        entry = self._tensor_metadata(key)
        shape = tuple(entry.size)
        start = tuple(start) if start is not None else (0,) * len(shape)
        size = tuple(size) if size is not None else tuple(s - o for s, o in zip(shape, start))
        out = torch.empty(size, dtype=entry.properties.dtype)
        covered = 0
        for chunk in entry.chunks:
            lo = [max(a, c) for a, c in zip(start, chunk.offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            data = self._load_chunk(key, tuple(chunk.offsets))
            source = data[tuple(slice(low - c, h - c) for low, h, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(low - a, h - a) for low, h, a in zip(lo, hi, start))] = source
            covered += source.numel()
            del data
        if covered != out.numel():
            raise UserError(f"{self.directory}: the chunks of {key} cover {covered} of the {out.numel()} values "
                            f"requested; the checkpoint is incomplete")
        return out

    def read_object(self, unique_key: str) -> Any:
        """A saved object (e.g. `rng_state/shard_0.0_1.1`), loaded under safe_load's rules."""
        if not isinstance(self.metadata.state_dict_metadata.get(unique_key), dcp.BytesStorageMetadata):
            raise UserError(f"{self.directory}: no object {unique_key!r} in the checkpoint")
        info = self._storage[(unique_key, None)]
        with open(self.directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            copies = load_bytes(f.read(info.length), f"{self.directory}/{unique_key}")
        if not isinstance(copies, list) or not copies:
            raise UserError(f"{self.directory}: object {unique_key} is not megatron-core's list of copies")
        return copies[0]


# ------------------------------------------------------------------------------------- writing


def _chunk_storage(key: str, offsets: tuple[int, ...]):
    return dcp.MetadataIndex(fqn=key, offset=torch.Size(offsets))


def write_rank_file(directory: Path, rank: int, entries: Iterable[TensorChunk | ObjectEntry]) -> list[tuple]:
    """Write one writer's chunks and objects into `__{rank}_0.distcp`; returns what `write_metadata` needs of them."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    relative = f"__{rank}_0.distcp"
    records = []
    with open(directory / relative, "wb") as f:
        for entry in entries:
            offset = f.tell()
            if isinstance(entry, TensorChunk):
                torch.save(entry.tensor.detach().contiguous().cpu(), f)
                chunk = (entry.key, tuple(entry.global_shape), tuple(entry.offsets), tuple(entry.tensor.shape),
                         entry.tensor.dtype)
                records.append(("tensor", chunk, _StorageInfo(relative, offset, f.tell() - offset)))
            else:
                buffer = io.BytesIO()
                torch.save([entry.value], buffer)  # megatron-core saves each object as a list of its local copies
                f.write(buffer.getbuffer())
                records.append(("object", entry.unique_key, _StorageInfo(relative, offset, f.tell() - offset)))
            del entry
        f.flush()
        os.fsync(f.fileno())
    return records


def write_metadata(directory: Path, records: Iterable[tuple], common: dict) -> None:
    """Write `.metadata` (from every writer's records), common.pt and metadata.json: the coordinator's part."""
    tensors: dict[str, dcp.TensorStorageMetadata] = {}
    entries: dict[str, Any] = {}
    storage = {}
    for kind, what, info in records:
        if kind == "tensor":
            key, global_shape, offsets, sizes, dtype = what
            meta = tensors.setdefault(key, dcp.TensorStorageMetadata(
                properties=dcp.TensorProperties(dtype=dtype), size=torch.Size(global_shape), chunks=[]))
            if tuple(meta.size) != tuple(global_shape):
                raise ValueError(f"{key}: chunks disagree on the global shape ({tuple(meta.size)} vs {global_shape})")
            storage[dcp.MetadataIndex(key, torch.Size(offsets), len(meta.chunks))] = info
            meta.chunks.append(dcp.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            entries[key] = meta
        else:
            entries[what] = dcp.BytesStorageMetadata()
            storage[dcp.MetadataIndex(what)] = info
    metadata = dcp.Metadata(state_dict_metadata=entries, storage_data=storage)
    with open(directory / METADATA_FILE, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    with open(directory / COMMON_FILE, "wb") as f:
        torch.save(common, f)
        f.flush()
        os.fsync(f.fileno())
    (directory / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))


# ------------------------------------------------------------------- megatron-core's model keys


def model_chunks(name: str, shard: torch.Tensor, *, tp_rank: int, tp: int, layer_offset: int, num_layers: int,
                 prefix: str = "") -> list[TensorChunk]:
    """The torch_dist chunks of one tp shard of a stage parameter (local layer numbering; global after `layer_offset`),
    or of a tensor of its optimizer state (saved under `prefix` + the parameter's key)."""
    parsed = names.split_layer_name(name)
    if parsed is None:
        if name == names.FINAL_NORM:
            return [TensorChunk(prefix + name, tuple(shard.shape), (0,) * shard.dim(), shard)]
        rows = shard.size(0)  # embedding and output layer: vocabulary rows split over tp
        return [TensorChunk(prefix + name, (rows * tp, *shard.shape[1:]), (rows * tp_rank, 0), shard)]
    layer, suffix = parsed
    layer += layer_offset
    key = prefix + names.stacked_key(suffix)

    def stacked(part: torch.Tensor, offsets: tuple[int, ...], global_shape: tuple[int, ...]) -> TensorChunk:
        return TensorChunk(key, (num_layers, *global_shape), (layer, *offsets), part.unsqueeze(0))

    if suffix in names.NORM_SUFFIXES:
        return [stacked(shard, (0,), tuple(shard.shape))]
    if suffix == names.FC1:  # this rank's [gate; up]: its gate rows among all gates, its up rows among all ups
        gate, up = shard.chunk(2)
        rows = gate.size(0)
        full = (2 * rows * tp, shard.size(1))
        return [stacked(gate, (rows * tp_rank, 0), full), stacked(up, (rows * (tp + tp_rank), 0), full)]
    if suffix in (names.QKV,):
        rows = shard.size(0)
        return [stacked(shard, (rows * tp_rank, 0), (rows * tp, shard.size(1)))]
    columns = shard.size(1)  # linear_proj, linear_fc2: input columns split over tp
    return [stacked(shard, (0, columns * tp_rank), (shard.size(0), columns * tp))]


def stage_entries(parts: Iterable[dict[str, torch.Tensor]], *, tp_rank: int, tp: int, layers: range, num_layers: int,
                  tied_head_copy: bool, prefix: str = "", extra_states: bool = True) -> Iterator[TensorChunk | ObjectEntry]:
    """What one (tp rank, stage) saves of its model (or of one kind of its optimizer state, keys under `prefix`):
    its chunks (tp-replicated norms from tp rank 0 only; no `tied_head_copy` of the embedding on the last stage),
    then the local spec's `_extra_state` objects."""
    for part in parts:
        for name, tensor in part.items():
            if tied_head_copy and name == names.OUTPUT_LAYER:
                continue  # saved once, as the embedding
            parsed = names.split_layer_name(name)
            replicated = name == names.FINAL_NORM or (parsed is not None and parsed[1] in names.NORM_SUFFIXES)
            if replicated and tp_rank > 0:
                continue
            yield from model_chunks(name, tensor, tp_rank=tp_rank, tp=tp, layer_offset=layers.start,
                                    num_layers=num_layers, prefix=prefix)
        del part
    if tp_rank == 0 and extra_states:
        yield from extra_state_objects(layers, num_layers)


def extra_state_objects(layers: range, num_layers: int) -> Iterator[ObjectEntry]:
    """The `_extra_state` objects (None) megatron-core's local spec saves for these global layers."""
    for layer in layers:
        for module in names.EXTRA_STATE_LAYER_MODULES:
            key = f"{names.LAYER_PREFIX}{module}{names.EXTRA_STATE_SUFFIX}"
            yield ObjectEntry(object_key(key, (layer,), (num_layers,)), None)


def param_key(name: str) -> str:
    """The torch_dist key a (global or local) parameter name is saved under."""
    parsed = names.split_layer_name(name)
    return name if parsed is None else names.stacked_key(parsed[1])


def read_full(reader: TorchDistReader, name: str, num_layers: int, prefix: str = "") -> torch.Tensor:
    """The full (all tp ranks) tensor of global parameter `name` (vocabulary padding kept), or of its
    optimizer state saved under `prefix` + its key."""
    parsed = names.split_layer_name(name)
    if parsed is None:
        return reader.read(prefix + name)
    layer, suffix = parsed
    key = prefix + names.stacked_key(suffix)
    shape = reader.shape(key)
    if shape[0] != num_layers:
        raise UserError(f"{reader.directory}: {key} stacks {shape[0]} layers, the model has {num_layers}")
    return reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))[0]
