"""Write one torch.save file whose large tensors arrive group by group, so it is never held whole.

    1. skeleton   torch.save of the record under torch.serialization.skip_data: the pickle and
                  the zip headers are written and every storage's bytes are reserved, not
                  written. Tensors still to come stand in the record as meta tensors and are
                  saved as FakeTensors (shape and dtype, no memory) on the cpu device.
    2. offsets    torch.load(map_location="meta") of the skeleton reads no data but tags each
                  storage with its byte offset in the file (`_checkpoint_offset`).
    3. data       the record's real tensors (RNG states, step counts), then each tensor of each
                  group as it arrives, are written at their offsets with os.pwrite; a group can
                  be freed once written.
    4. checksums  skip_data leaves the zip CRC-32 of the data records at 0; the CRC of the
                  bytes written is filled in, so zip tools accept the file as well. Then fsync.

The file holds the records torch.save of the whole record writes, with the same bytes in
them (the pickle differs only in how it memoizes repeated strings; the serialization id is
random anyway), and loads with torch.load(weights_only=True), memory-mapped or not.
Memory: the skeleton costs nothing per tensor; FakeTensorMode imports torch._dynamo once
(~70 MB, ~1 s). A torch without skip_data (< 2.5), or one that does not report the offsets,
gets `write_in_memory` instead: the same file, built whole. Writing is not atomic by itself:
callers write into a directory renamed into place afterwards (write_all_shards in reshard.py).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megagrow.checkpoint.safe_load import plain_globals

# Where a tensor sits in a record: the keys and list indices leading to it.
KeyPath = tuple[Any, ...]
# One group of tensors of a record, by where they go.
Fill = dict[KeyPath, torch.Tensor]

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # zip central directory entry, 46 bytes
_CENTRAL_HEADER_SIGNATURE = 0x02014B50
_DATA_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_HAS_DATA_DESCRIPTOR = 0x08  # general purpose flag bit 3: CRC and sizes follow the data


@dataclass
class ShardStream:
    """A file's record, with meta tensors standing for the data that `fills` delivers group by group."""

    record: dict
    # Every meta tensor of `record` appears in exactly one fill, with its shape and dtype.
    fills: Iterable[Fill] = ()


def walk_tensors(obj: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """Every tensor of a nested dict / list / tuple record, with its key path, in pickling order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk_tensors(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from walk_tensors(value, (*path, index))


def _replace_tensors(obj: Any, replace) -> Any:
    if isinstance(obj, torch.Tensor):
        return replace(obj)
    if isinstance(obj, dict):
        return type(obj)((key, _replace_tensors(value, replace)) for key, value in obj.items())
    if isinstance(obj, list):
        return [_replace_tensors(value, replace) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_tensors(value, replace) for value in obj)
    return obj


def _lookup(obj: Any, path: KeyPath) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def streaming_supported() -> bool:
    """Whether this torch can write a file's skeleton first (torch.serialization.skip_data, torch >= 2.5)."""
    return hasattr(torch.serialization, "skip_data")


def _skeleton(record: dict) -> dict:
    # Meta tensors are not given storage by torch.save; FakeTensors on cpu are, without memory.
    modes = []  # created on first need: FakeTensorMode imports torch._dynamo

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor
        if not modes:
            from torch._subclasses.fake_tensor import FakeTensorMode

            modes.append(FakeTensorMode())
        with modes[0]:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")

    return _replace_tensors(record, fake)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _storage_bytes(tensor: torch.Tensor) -> memoryview:
    # A real tensor of the record is saved with its whole storage, as torch.save does.
    storage = tensor.detach().cpu().untyped_storage()
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).numpy())


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:  # os.pwrite may write less than asked (at most ~2 GB per call on Linux)
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class _Writer:
    """Writes tensor bytes into the reserved storages of a skeleton file and keeps their CRC-32."""

    def __init__(self, fd: int, offsets: dict):
        self.fd, self.offsets = fd, offsets
        self.written: dict[int, tuple[int, int]] = {}  # data offset of a storage record -> (size, CRC-32)

    def write(self, path: KeyPath, data: memoryview) -> None:
        offset = self.offsets[path]
        _pwrite(self.fd, data, offset)
        self.written[offset] = (data.nbytes, zlib.crc32(data))


def write_tensor(writer: _Writer, path: KeyPath, tensor: torch.Tensor) -> None:
    """Write one delivered tensor into its reserved bytes (tests wrap this to watch what is alive)."""
    writer.write(path, _as_bytes(tensor))


def _storage_offsets(path: Path, record: dict) -> dict[KeyPath, int] | None:
    """Byte offset in the file of each tensor's storage; None where this torch does not report them."""
    with plain_globals():  # our own record: Megatron's args Namespace is its one non-torch class
        loaded = torch.load(path, map_location="meta", weights_only=True)
    offsets = {}
    for key_path, _ in walk_tensors(record):
        offset = getattr(_lookup(loaded, key_path).untyped_storage(), "_checkpoint_offset", None)
        if offset is None:
            return None
        offsets[key_path] = offset
    return offsets


def _fill_crc32(fd: int, path: Path, written: dict[int, tuple[int, int]]) -> None:
    """Put the CRC-32 of each data record written into its data descriptor (or local header) and central entry.

    Also checks that every write landed exactly on one record's data (torch computes the
    offsets from miniz's layout rather than reading them), else the file is refused.
    """
    with zipfile.ZipFile(path) as archive:
        entries, central = archive.infolist(), archive.start_dir
    for entry in entries:  # central directory entries are in the same order
        header = _LOCAL_HEADER.unpack(os.pread(fd, _LOCAL_HEADER.size, entry.header_offset))
        central_entry = _CENTRAL_HEADER.unpack(os.pread(fd, _CENTRAL_HEADER.size, central))
        if header[0] != _LOCAL_HEADER_SIGNATURE or central_entry[0] != _CENTRAL_HEADER_SIGNATURE:
            raise RuntimeError(f"{path}: zip headers of {entry.filename} not where expected; torch.save's layout changed")
        data = entry.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
        size, crc = written.pop(data, (None, None))
        if size is not None and size != entry.file_size:
            raise RuntimeError(f"{path}: {size} bytes written into {entry.filename}, which holds {entry.file_size}; "
                               f"torch.save's layout changed")
        if crc is not None and crc != entry.CRC:
            packed = struct.pack("<I", crc)
            if entry.flag_bits & _HAS_DATA_DESCRIPTOR:
                descriptor = data + entry.compress_size
                if os.pread(fd, 4, descriptor) == _DATA_DESCRIPTOR_SIGNATURE:
                    descriptor += 4
                os.pwrite(fd, packed, descriptor)
            else:
                os.pwrite(fd, packed, entry.header_offset + 14)
            os.pwrite(fd, packed, central + 16)
        central += _CENTRAL_HEADER.size + sum(central_entry[10:13])  # + name, extra field, comment
    if written:  # torch placed a storage where these headers say no record's data starts
        raise RuntimeError(f"{path}: no zip record holds the data written at offsets {sorted(written)[:3]}; "
                           f"torch.save's layout changed")


def write_in_memory(path: Path, shard: ShardStream) -> None:
    """Build the whole record in memory and torch.save it (torch without skip_data; peak: the whole file)."""
    record = _replace_tensors(shard.record, lambda tensor: tensor)
    for fill in shard.fills:
        for key_path, tensor in fill.items():
            *parents, last = key_path
            _lookup(record, tuple(parents))[last] = tensor
    with open(path, "wb") as f:
        torch.save(record, f)
        f.flush()
        os.fsync(f.fileno())


def _write_fill(writer: _Writer, deferred: dict[KeyPath, torch.Tensor], fill: Fill) -> None:
    for key_path, tensor in fill.items():
        expected = deferred.pop(key_path, None)
        if expected is None:
            raise ValueError(f"{key_path} is not awaited (not a meta tensor of the record, or delivered twice)")
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"{key_path} arrived as {tuple(tensor.shape)} {tensor.dtype}; the skeleton reserved "
                             f"{tuple(expected.shape)} {expected.dtype}")
        write_tensor(writer, key_path, tensor)


def write_streamed(path: str | os.PathLike, shard: ShardStream) -> None:
    """Write `shard` to `path` like torch.save of its full record, holding one fill at a time."""
    path = Path(path)
    if not streaming_supported():
        write_in_memory(path, shard)
        return
    with open(path, "wb") as f, torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(_skeleton(shard.record), f)
    offsets = _storage_offsets(path, shard.record)
    if offsets is None:
        write_in_memory(path, shard)
        return
    deferred = {key_path: tensor for key_path, tensor in walk_tensors(shard.record) if tensor.is_meta}
    fd = os.open(path, os.O_RDWR)
    try:
        writer = _Writer(fd, offsets)
        for key_path, tensor in walk_tensors(shard.record):
            if not tensor.is_meta:
                writer.write(key_path, _storage_bytes(tensor))
        for fill in shard.fills:
            _write_fill(writer, deferred, fill)
            del fill  # else it stays referenced while the next group is produced
        if deferred:
            raise ValueError(f"{path}: {len(deferred)} tensors never arrived, e.g. {next(iter(deferred))}")
        _fill_crc32(fd, path, writer.written)
        os.fsync(fd)
    finally:
        os.close(fd)
