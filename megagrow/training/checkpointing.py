"""Sharded checkpoints in Megatron's layout, saved atomically and loaded without running code.

Layout (as Megatron-LM's `torch` format, so its users find what they expect):

    {root}/latest_checkpointed_iteration.txt          "1000"
    {root}/iter_0001000/mp_rank_TT/model_optim_rng.pt       pipeline size 1
    {root}/iter_0001000/mp_rank_TT_PPP/model_optim_rng.pt   pipeline size > 1

TT is the tensor-parallel rank, PPP the pipeline rank. Each file holds one (tp, pp)
shard's state dict: plain dicts, lists, numbers, strings and tensors only, so it loads
with `torch.load(weights_only=True)` and a checkpoint can never run code.

Atomicity: every rank writes into `iter_XXXXXXX.tmp/`; after a barrier the coordinator
fsyncs, renames the directory into place and only then rewrites the tracker file (itself
via a temporary name). A crash at any point leaves the previous checkpoint and tracker
intact; stale `.tmp` directories are removed by the next save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megagrow.errors import UserError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
SHARD_FILENAME = "model_optim_rng.pt"
_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Directory of one saved iteration."""
    return Path(root) / f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's shard directory name: the pipeline rank appears only when pp > 1."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(root: str | os.PathLike, iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """File holding the (tp_rank, pp_rank) shard of an iteration."""
    return iteration_dir(root, iteration) / shard_dir_name(tp_rank, pp_rank, pp_size) / SHARD_FILENAME


def read_tracker(root: str | os.PathLike) -> int | None:
    """Iteration named by the tracker file, or None when `root` holds no checkpoint."""
    tracker = Path(root) / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":  # Megatron's name for converted, iteration-less checkpoints
        return 0
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{tracker}: expected an iteration number, found {text!r}; fix or delete the file") from None


def checkpoint_layout(root: str | os.PathLike, iteration: int) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of a saved iteration, read from its shard directories."""
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory} (check --load and the iteration)")
    coords = []
    for entry in directory.iterdir():
        match = _SHARD_DIR.match(entry.name)
        if match and (entry / SHARD_FILENAME).is_file():
            coords.append((int(match.group(1)), int(match.group(2) or 0)))
    if not coords:
        raise UserError(f"{directory}: no mp_rank_* shards with {SHARD_FILENAME}; the checkpoint is incomplete")
    tp = max(c[0] for c in coords) + 1
    pp = max(c[1] for c in coords) + 1
    missing = sorted({(t, p) for t in range(tp) for p in range(pp)} - set(coords))
    if missing:
        names = ", ".join(shard_dir_name(t, p, pp) for t, p in missing[:4])
        raise UserError(f"{directory}: shards missing for a tp={tp} pp={pp} layout ({names}); the checkpoint is incomplete")
    return tp, pp


def _default_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _default_is_coordinator() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    shard_state: dict[str, Any] | None,
    *,
    tp_rank: int = 0,
    pp_rank: int = 0,
    pp_size: int = 1,
    extra_files: dict[str, dict[str, Any]] | None = None,
    barrier: Callable[[], None] = _default_barrier,
    is_coordinator: Callable[[], bool] = _default_is_coordinator,
) -> Path:
    """Collectively save one iteration; ranks with `shard_state=None` (dp replicas) write nothing.

    `extra_files` (name -> state) are written beside the shard file by this rank, e.g. the
    per-dp-rank optimizer slices of the distributed optimizer.
    """
    root = Path(root)
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    if is_coordinator():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir.mkdir()
    barrier()
    files = dict(extra_files or {})
    if shard_state is not None:
        files[SHARD_FILENAME] = shard_state
    shard_dir = tmp_dir / shard_dir_name(tp_rank, pp_rank, pp_size)
    for name, content in files.items():
        shard_dir.mkdir(parents=True, exist_ok=True)
        with open(shard_dir / name, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
    barrier()
    if is_coordinator():
        for sub in tmp_dir.iterdir():
            _fsync_path(sub)
        _fsync_path(tmp_dir)
        if final_dir.exists():  # re-saving an iteration: swap, never leave both missing
            old = final_dir.with_name(final_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
        _fsync_path(root)
        write_tracker(root, iteration)
    barrier()
    return final_dir


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Point the tracker file at `iteration` (atomically: readers see the old or the new number)."""
    _write_file_atomically(Path(root) / TRACKER_FILENAME, f"{iteration}\n")


def load_shard(
    root: str | os.PathLike,
    *,
    iteration: int | None = None,
    tp_rank: int = 0,
    pp_rank: int = 0,
    pp_size: int = 1,
    filename: str = SHARD_FILENAME,
) -> dict[str, Any]:
    """Load one shard's file (model_optim_rng.pt of the latest iteration by default) with weights_only=True."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise UserError(f"no checkpoint in {root}: {TRACKER_FILENAME} is missing (check --load)")
    path = shard_path(root, iteration, tp_rank, pp_rank, pp_size).with_name(filename)
    if not path.is_file():
        try:
            tp, pp = checkpoint_layout(root, iteration)
            hint = f"the checkpoint was saved with tp={tp} pp={pp}; reshard it with tools/convert_checkpoint.py"
        except UserError as err:
            hint = str(err)
        raise UserError(f"checkpoint shard not found: {path} ({hint})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors: the file is damaged or not ours
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be loaded safely ({first_line}); the checkpoint is corrupt or holds code") from None


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in weights_only-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by get_rng_state."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
