"""The one way megagrow opens a checkpoint file: tensors and plain data only, never code.

Every checkpoint megagrow reads — its own, Megatron-LM's (`torch` and `torch_dist`),
DeepSpeed's, a converted one — goes through `load_file`, which is `torch.load(weights_only=
True)` plus an explicit allowlist of the plain classes these formats pickle:

    argparse.Namespace        Megatron-LM's `args`
    numpy arrays and dtypes   the numpy RNG state inside Megatron's `rng_state`
    io.BytesIO                Transformer Engine's `_extra_state` in older Megatron-LM files
    builtins.getattr          only as `getattr(EnumClass, "MEMBER")`, how Python 3.11.0-3.11.4
                              pickle enum members; read as a record of the member's name
    megatron.* classes        enums in `args` (ModelType, AttnBackend, ...); they are NOT
                              imported: each is read into a `MegatronObject` record holding
                              the class name and the values it was built from, so no code of
                              Megatron (installed or not) runs and any version's enums load
    deepspeed.* classes       a fixed list of DeepSpeed's plain records (ZeRO stage enum, loss
                              scaler settings), read into `MegatronObject` records likewise

The file's globals are listed from its pickle opcodes before anything is unpickled; one
outside the allowlist refuses the file with one line naming the file and the global.
`torch.distributed.checkpoint` metadata (`.metadata` of a torch_dist directory) is a plain
pickle of torch's own dataclasses and is read by `load_dcp_metadata` with an unpickler that
resolves exactly those classes.
"""

from __future__ import annotations

import argparse
import enum
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megagrow.errors import UserError

# DeepSpeed's plain records that its checkpoints pickle (read as MegatronObject, never imported).
DEEPSPEED_RECORDS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class MegatronObject:
    """A stand-in for an object of a foreign class (a Megatron enum, a DeepSpeed record): its name and values, no behaviour."""

    qualified_name = ""
    member_name: str | None = None  # set for an enum member pickled by name (see enum_member_record)

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """What an enum member was built from (its value), else None."""
        return self.args[0] if len(self.args) == 1 else None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MegatronObject) and other.qualified_name == self.qualified_name
                and other.args == self.args and other.state == self.state and other.member_name == self.member_name)

    def __hash__(self) -> int:
        return hash((self.qualified_name, repr(self.args), self.member_name))

    def __repr__(self) -> str:
        if self.member_name:
            return f"{self.qualified_name}.{self.member_name}"
        return f"{self.qualified_name}{self.args!r}"


def _stand_in(qualified_name: str) -> type:
    # One subclass per foreign name, so two enums of different classes never compare equal.
    return type(qualified_name.rsplit(".", 1)[-1], (MegatronObject,), {"qualified_name": qualified_name})


def enum_member_record(cls: Any, name: Any) -> Any:
    """Stands in for `builtins.getattr` in a checkpoint: `getattr(ForeignEnum, "MEMBER")` becomes that member.

    Python 3.11.0-3.11.4 pickle enum members as that call, so Megatron-LM's `args` and DeepSpeed's
    ZeRO stage written under those versions hold it. Only a string name is accepted, on a stand-in
    class (the result is a record naming the member) or, where torch's loader resolved the class to
    the installed one, on a foreign Enum class (a lookup in its members, no attribute access).
    """
    if isinstance(name, str) and isinstance(cls, type):
        if issubclass(cls, MegatronObject):
            member = cls()
            member.member_name = name
            return member
        if (issubclass(cls, enum.Enum) and _foreign_record(f"{cls.__module__}.{cls.__qualname__}")
                and name in cls.__members__):
            return cls.__members__[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not an enum member of an allowed class")


_NOT_A_MEMBER = re.compile(r"(getattr\(.*\)) is not an enum member of an allowed class")


def _numpy_globals() -> list:
    multiarray = getattr(np, "_core", None) or np.core
    reconstruct = multiarray.multiarray._reconstruct
    dtype_classes = [type(np.dtype(kind)) for kind in ("uint32", "int64", "float64", "int32", "uint8")]
    names = [reconstruct, np.ndarray, np.dtype, *dtype_classes]
    # numpy 1.x pickles arrays as numpy.core.multiarray, 2.x as numpy._core.multiarray: allow both spellings.
    return names + [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]


_PLAIN_GLOBALS = [argparse.Namespace, io.BytesIO, *_numpy_globals(), (enum_member_record, "builtins.getattr")]


def plain_globals():
    """A context in which torch.load(weights_only=True) also accepts the plain classes above (not foreign ones)."""
    return torch.serialization.safe_globals(_PLAIN_GLOBALS)


def _foreign_record(name: str) -> bool:
    return name.startswith("megatron.") or name in DEEPSPEED_RECORDS


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def checkpoint_globals(path: str | os.PathLike) -> list[str]:
    """The globals a checkpoint file would need beyond weights_only's own, read without unpickling anything."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file ends in one line
        raise UserError(f"{path}: not a readable checkpoint file ({_first_line(err)}); it is damaged or not a "
                        f"checkpoint") from None


def check_file(path: str | os.PathLike) -> list[str]:
    """Refuse (one line) a checkpoint file that would import anything beyond the allowlist, without unpickling it.

    Returns the foreign record names it holds (read as stand-ins by load_file).
    """
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _PLAIN_GLOBALS}
    foreign = []
    for name in checkpoint_globals(path):
        if _foreign_record(name):
            foreign.append(name)
        elif name not in allowed:
            raise UserError(f"{path}: refused, it would import {name!r} when loaded, which can run code; "
                            f"megagrow loads only tensors and plain data (delete or re-create the file)")
    return foreign


def load_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """Load one checkpoint file with weights_only=True and the allowlist above, or refuse it in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    stand_ins = [(_stand_in(name), name) for name in check_file(path)]
    try:
        with torch.serialization.safe_globals(_PLAIN_GLOBALS + stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors: the file is damaged
        refused = _NOT_A_MEMBER.search(str(err))
        if refused:
            raise UserError(f"{path}: refused, it calls {refused.group(1)}, not on an enum member; such calls can "
                            f"run code, and megagrow loads only tensors and plain data (delete or re-create the file)"
                            ) from None
        raise UserError(f"{path}: cannot be loaded ({_first_line(err)}); the file is damaged or truncated") from None


def load_bytes(data: bytes, where: str) -> Any:
    """Load a torch.save'd object held in memory (a torch_dist byte entry) under the same rules as load_file."""
    import tempfile

    # get_unsafe_globals_in_checkpoint and the allowlist work on files; these entries are small.
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(data)
        f.flush()
        try:
            return load_file(f.name)
        except UserError as err:
            raise UserError(str(err).replace(f.name, where)) from None


# torch.distributed.checkpoint metadata: torch's own dataclasses, named here one by one.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint._extension", "StreamTransformExtension"),
    ("torch", "Size"), ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
    ("torch", "channels_last"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("enum", "Enum"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id of a plain dcp.save
} | {("torch", name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                                 "uint8", "bool", "float8_e4m3fn", "float8_e5m2")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _dcp_enum_member
        if (module, name) not in _DCP_CLASSES:
            raise pickle.UnpicklingError(f"it would import {module}.{name}")
        return super().find_class(module, name)


def _dcp_enum_member(cls: Any, name: Any) -> enum.Enum:
    # getattr(TorchEnum, "MEMBER"), as Python 3.11.0-3.11.4 pickle enum members: only a member of
    # one of the allowed torch enums, by name.
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and (cls.__module__, cls.__qualname__) in _DCP_CLASSES
            and isinstance(name, str) and name in cls.__members__):
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not a member of an allowed enum")
    return cls[name]


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """The `.metadata` of a torch.distributed.checkpoint directory, unpickling only torch's metadata classes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _DCPMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a torch_dist checkpoint needs its .metadata file") from None
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: refused or unreadable ({_first_line(err)}); megagrow reads only "
                        f"torch.distributed.checkpoint metadata") from None
