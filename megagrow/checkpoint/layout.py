"""Where a checkpoint's files are, and how one iteration is written atomically (Megatron-LM's layout).

    {root}/latest_checkpointed_iteration.txt          "1000" (or "release")
    {root}/iter_0001000/mp_rank_TT/model_optim_rng.pt       torch format, pipeline size 1
    {root}/iter_0001000/mp_rank_TT_PPP/model_optim_rng.pt   torch format, pipeline size > 1
    {root}/iter_0001000/{.metadata, *.distcp, common.pt, metadata.json}   torch_dist format
    {root}/release/...                                  an iteration-less (converted) checkpoint

TT is the tensor-parallel rank, PPP the pipeline rank. What the files hold is described by
megagrow/checkpoint/megatron_state.py (torch) and torch_dist.py; they are read only through
megagrow/checkpoint/safe_load.py, so a checkpoint can never run code.

Atomicity: every rank writes into `iter_XXXXXXX.tmp/`; after a barrier the coordinator
fsyncs, renames the directory into place and only then rewrites the tracker file (itself
via a temporary name). A crash at any point leaves the previous checkpoint and tracker
intact; stale `.tmp` directories are removed by the next save.

Nodes without a shared filesystem: --save may be a node-local disk. A node whose ranks
cannot see the directory global rank 0 created gets its own coordinator (its local rank 0),
which creates, publishes and tracks the same iteration in that node's directory: every node
then holds its own ranks' files and a tracker, and resumes from them (a rank loading the
layout it saved reads only its own files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from megagrow.checkpoint.safe_load import load_file
from megagrow.errors import UserError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
SHARD_FILENAME = "model_optim_rng.pt"
RELEASE = "release"  # Megatron's tracker word and directory for iteration-less checkpoints
TORCH, TORCH_DIST = "torch", "torch_dist"
CKPT_FORMATS = (TORCH, TORCH_DIST)
TORCH_DIST_CONFIG = "metadata.json"
_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")
Iteration = int | str  # an iteration number, or RELEASE


def iteration_dir(root: str | os.PathLike, iteration: Iteration) -> Path:
    """Directory of one saved iteration."""
    if iteration == RELEASE:
        return Path(root) / RELEASE
    return Path(root) / f"iter_{iteration:07d}"


def iteration_number(iteration: Iteration) -> int:
    """The training iteration a checkpoint resumes at (a release checkpoint starts a run at 0)."""
    return 0 if iteration == RELEASE else int(iteration)


def shard_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's shard directory name: the pipeline rank appears only when pp > 1."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(root: str | os.PathLike, iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """File holding the (tp_rank, pp_rank) shard of an iteration."""
    return iteration_dir(root, iteration) / shard_dir_name(tp_rank, pp_rank, pp_size) / SHARD_FILENAME


def read_tracker(root: str | os.PathLike) -> Iteration | None:
    """Iteration named by the tracker file (a number, or RELEASE), or None when `root` holds no checkpoint."""
    tracker = Path(root) / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{tracker}: cannot be read ({err}); fix or delete the file") from None
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}; fix or "
                        f"delete the file") from None


def parse_iteration(text: str | int | None) -> Iteration | None:
    """An --iteration flag's value: a number, 'release', or None for the tracker's."""
    if text is None or isinstance(text, int) or text == RELEASE:
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--iteration {text!r}: give an iteration number or 'release'") from None


def checkpoint_format(root: str | os.PathLike, iteration: Iteration) -> str:
    """TORCH or TORCH_DIST: how the iteration's files are laid out."""
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory} (check --load and the iteration)")
    config = directory / TORCH_DIST_CONFIG
    if config.is_file():
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(f"{config}: not a readable metadata.json ({err}); the checkpoint is damaged") from None
        if backend != TORCH_DIST:
            raise UserError(f"{config}: sharded_backend {backend!r} is not supported; megagrow reads the torch and "
                            f"torch_dist formats (convert with Megatron-LM's --ckpt-convert-format torch_dist)")
        return TORCH_DIST
    if (directory / ".metadata").is_file():
        return TORCH_DIST
    return TORCH


def checkpoint_layout(root: str | os.PathLike, iteration: Iteration) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of a saved torch-format iteration, from its shard directories."""
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory} (check --load and the iteration)")
    coords = []
    for entry in directory.iterdir():
        match = _SHARD_DIR.match(entry.name)
        if match and match.group(3):
            raise UserError(f"{entry}: an expert-parallel shard; megagrow reads dense Llama models only, not MoE")
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


_COORDINATOR_MARK = ".coordinator"


def _sees_coordinator_files(tmp_dir: Path, is_coordinator: Callable[[], bool]) -> bool:
    """Whether this rank sees the directory global rank 0 just created (collective: rank 0 marks it with a token)."""
    if is_coordinator is not _default_is_coordinator or not torch.distributed.is_initialized():
        return True  # one process, or a caller that plays every rank itself
    token = [os.urandom(8).hex() if is_coordinator() else None]
    if is_coordinator():
        (tmp_dir / _COORDINATOR_MARK).write_text(token[0])
    torch.distributed.broadcast_object_list(token, src=0)
    try:
        return (tmp_dir / _COORDINATOR_MARK).read_text() == token[0]
    except OSError:
        return False


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


def save_iteration(
    root: str | os.PathLike,
    iteration: Iteration,
    write: Callable[[Path, bool], None],
    *,
    barrier: Callable[[], None] = _default_barrier,
    is_coordinator: Callable[[], bool] = _default_is_coordinator,
) -> Path:
    """Collectively save one iteration atomically: every rank calls `write(tmp_dir, own_copy)`, then the coordinator
    of each directory publishes it. `own_copy` is True on a node that cannot see global rank 0's directory and keeps
    its own copy of the checkpoint (its ranks must write everything the node needs to resume)."""
    root = Path(root)
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob("iter_*.tmp"), *root.glob(f"{RELEASE}.tmp")]:  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir.mkdir()

    if is_coordinator():
        prepare()
    barrier()
    own_copy = not _sees_coordinator_files(tmp_dir, is_coordinator)
    # Ranks of one node share a filesystem, so local rank 0 publishes for a node that keeps its own copy.
    publishes = is_coordinator() or (own_copy and int(os.environ.get("LOCAL_RANK", "-1")) == 0)
    if own_copy and publishes:
        prepare()
    barrier()
    write(tmp_dir, own_copy)
    barrier()
    if publishes:
        (tmp_dir / _COORDINATOR_MARK).unlink(missing_ok=True)
        for sub in tmp_dir.iterdir():
            if sub.is_dir():
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


def save_checkpoint(
    root: str | os.PathLike,
    iteration: Iteration,
    shard_state: dict[str, Any] | None,
    *,
    tp_rank: int = 0,
    pp_rank: int = 0,
    pp_size: int = 1,
    writes: Callable[[bool], bool] | None = None,
    barrier: Callable[[], None] = _default_barrier,
    is_coordinator: Callable[[], bool] = _default_is_coordinator,
) -> Path:
    """Collectively save one torch-format iteration.

    A rank writes its `shard_state` if `writes(own_copy)` says so (default: when it has one);
    `own_copy` tells a rank on a node that keeps its own copy of the checkpoint (see save_iteration).
    """
    def write(tmp_dir: Path, own_copy: bool) -> None:
        writes_here = writes(own_copy) if writes is not None else shard_state is not None
        if writes_here and shard_state is not None:
            shard_dir = tmp_dir / shard_dir_name(tp_rank, pp_rank, pp_size)
            shard_dir.mkdir(parents=True, exist_ok=True)
            write_file_synced(shard_dir / SHARD_FILENAME, shard_state)

    return save_iteration(root, iteration, write, barrier=barrier, is_coordinator=is_coordinator)


def write_file_synced(path: Path, content: Any) -> None:
    """torch.save `content` to `path` and fsync it, so a rename after it publishes complete bytes."""
    with open(path, "wb") as f:
        torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())


def write_tracker(root: str | os.PathLike, iteration: Iteration) -> None:
    """Point the tracker file at `iteration` (atomically: readers see the old or the new number)."""
    _write_file_atomically(Path(root) / TRACKER_FILENAME, f"{iteration}\n")


def load_shard(
    root: str | os.PathLike,
    *,
    iteration: Iteration | None = None,
    tp_rank: int = 0,
    pp_rank: int = 0,
    pp_size: int = 1,
    filename: str = SHARD_FILENAME,
) -> dict[str, Any]:
    """Load one shard's file (model_optim_rng.pt of the latest iteration by default), tensors and plain data only."""
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
    return load_file(path)
