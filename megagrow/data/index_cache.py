"""On-disk cache of dataset indices (.npy), built once and memory-mapped by every rank.

A cache entry is a set of arrays named by a hash of a JSON description of
everything that defines them, so a changed parameter can never pick up stale
indices:

    {cache_dir}/{kind}-{hash}.json           the description, for humans (written last)
    {cache_dir}/{kind}-{hash}-{array}.npy    one file per array

Every file is written under a temporary name and renamed into place, and an entry
counts as present only when its description file and all its arrays are, so an
interrupted build is never read back.

With torch.distributed initialised the protocol is collective (every rank calls
`load_or_build` with the same arguments): global rank 0 builds; the others wait,
then look for the files. On a node that does not share rank 0's filesystem the
local rank 0 builds its own copy — the builders are deterministic, so the bytes
are identical — while the node's other ranks wait. Then every rank memory-maps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megagrow.errors import UserError

logger = logging.getLogger("megagrow.data")

# Bump whenever the content of any cached array changes meaning, so old caches are ignored.
# 2: blends follow megatron-core (its order, length sum_d ceil(N * w_d), per-dataset sizes).
FORMAT_VERSION = 2
_HASH_CHARS = 32


def cache_key(kind: str, description: Mapping) -> str:
    """File stem `{kind}-{hash}` for a description (hash of its canonical JSON plus the format version)."""
    canonical = json.dumps(
        {"format_version": FORMAT_VERSION, "kind": kind, **description}, sort_keys=True, default=_json_scalar
    )
    return f"{kind}-{hashlib.sha256(canonical.encode()).hexdigest()[:_HASH_CHARS]}"


def entry_paths(cache_dir: str | os.PathLike, key: str, names: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """The description file and the per-array .npy paths of a cache entry."""
    cache_dir = Path(cache_dir)
    return cache_dir / f"{key}.json", {name: cache_dir / f"{key}-{name}.npy" for name in names}


def entry_exists(cache_dir: str | os.PathLike, key: str, names: Sequence[str]) -> bool:
    """True when the description and every array of the entry are in place."""
    description_path, array_paths = entry_paths(cache_dir, key, names)
    return description_path.is_file() and all(p.is_file() for p in array_paths.values())


def load_or_build(
    cache_dir: str | os.PathLike,
    kind: str,
    description: Mapping,
    names: Sequence[str],
    build: Callable[[], Mapping[str, np.ndarray]],
    label: str = "",
) -> dict[str, np.ndarray]:
    """Memory-mapped arrays `names` of the entry for `description`, building them with `build` if missing.

    `label` names the indices in the log line (e.g. "train split of data/code").
    """
    key = cache_key(kind, description)
    start = time.perf_counter()
    if _distributed():
        built = _load_or_build_distributed(cache_dir, key, kind, description, names, build)
    else:
        built = not entry_exists(cache_dir, key, names)
        if built:
            write_entry(cache_dir, key, kind, description, build())
    arrays = read_entry(cache_dir, key, names)
    logger.debug(
        "%s %s indices%s in %.2f s: %s",
        "built" if built else "loaded",
        kind,
        f" of {label}" if label else "",
        time.perf_counter() - start,
        Path(cache_dir) / key,
    )
    return arrays


def write_entry(
    cache_dir: str | os.PathLike, key: str, kind: str, description: Mapping, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write the arrays, then the description, each atomically (temporary file, then rename)."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        description_path, array_paths = entry_paths(cache_dir, key, list(arrays))
        for name, array in arrays.items():
            _write_atomically(array_paths[name], lambda f, a=array: np.save(f, a, allow_pickle=False))
        record = {
            "kind": kind,
            "format_version": FORMAT_VERSION,
            "description": dict(description),
            "arrays": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in arrays.items()},
            "built_on": socket.gethostname(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        text = json.dumps(record, indent=2, sort_keys=True, default=_json_scalar) + "\n"
        _write_atomically(description_path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise UserError(
            f"cannot write dataset index cache in {cache_dir}: {err.strerror or err}; "
            f"pass --data-cache-path with a writable directory"
        ) from err


def read_description(cache_dir: str | os.PathLike, key: str) -> dict:
    """The description record of a cache entry (what it was built from, its arrays, where and when)."""
    description_path = Path(cache_dir) / f"{key}.json"
    try:
        record = json.loads(description_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"{description_path}: unreadable index cache description ({err}); {_remedy(cache_dir, key)}"
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
        raise UserError(f"{description_path}: not an index cache description; {_remedy(cache_dir, key)}")
    return record


def read_entry(cache_dir: str | os.PathLike, key: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Memory-map the arrays of an entry, checking them against its description file."""
    description_path, array_paths = entry_paths(cache_dir, key, names)
    remedy = _remedy(cache_dir, key)
    expected = read_description(cache_dir, key)["arrays"]
    arrays = {}
    for name, path in array_paths.items():
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: corrupt index cache file ({err}); {remedy}") from err
        spec = expected.get(name)
        if spec is None or str(array.dtype) != spec.get("dtype") or list(array.shape) != spec.get("shape"):
            found = f"{array.dtype}{list(array.shape)}"
            raise UserError(f"{path}: array {found} does not match {description_path}; {remedy}")
        arrays[name] = array
    return arrays


class PicklesByCacheLocation:
    """Mixin for datasets holding cached index arrays as the attributes named in `index_names`.

    Pickles leave the arrays out and unpickling memory-maps them again from
    `cache_dir`/`cache_key`, so DataLoader workers started by "spawn" map the
    cache files instead of receiving copies of them.
    """

    index_names: tuple[str, ...] = ()
    cache_dir: Path
    cache_key: str

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self.index_names}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.update(read_entry(self.cache_dir, self.cache_key, self.index_names))


def _remedy(cache_dir: str | os.PathLike, key: str) -> str:
    return f"delete {Path(cache_dir) / key}* and run again to rebuild it"


def _json_scalar(value):
    """numpy scalars as Python numbers, so a description may hold either."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_atomically(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a unique temporary beside `path`, fsync, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _load_or_build_distributed(cache_dir, key, kind, description, names, build) -> bool:
    """Rank 0 builds, then any node that cannot see its files builds on local rank 0; True if this rank built."""
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    built = False

    def build_here() -> None:
        nonlocal built
        write_entry(cache_dir, key, kind, description, build())
        built = True

    _collectively(rank == 0 and not entry_exists(cache_dir, key, names), build_here)
    _collectively(local_rank == 0 and not entry_exists(cache_dir, key, names), build_here)
    visible = entry_exists(cache_dir, key, names)
    if not _all_ranks_succeeded(visible):
        where = "this rank" if not visible else "another rank"
        raise UserError(
            f"index cache {Path(cache_dir) / key}* is missing on {where} after building; launch with "
            f"torchrun/deepspeed (they set LOCAL_RANK) or pass a --data-cache-path every node can read"
        )
    return built


def _collectively(should_run: bool, step: Callable[[], None]) -> None:
    """Run `step` where asked, then wait for all ranks; if it failed anywhere, fail everywhere."""
    error = None
    if should_run:
        try:
            step()
        except Exception as err:  # re-raised below, after the other ranks have been told
            error = err
    # A plain barrier would leave the other ranks waiting forever for a rank that raised.
    if not _all_ranks_succeeded(error is None):
        if error is not None:
            raise error
        raise UserError("building the dataset index cache failed on another rank; see that rank's error")


def _all_ranks_succeeded(ok: bool) -> bool:
    """All-reduce a flag with MIN: True only if every rank passed True (doubles as a barrier)."""
    # NCCL only reduces tensors on the GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
