"""Checks run before anything is built, so a wrong path fails in seconds, not after the model and optimizer.

What is checked: every dataset of --data-path opens (both files present, the `.idx` header
consistent with the `.bin`), the --load checkpoint is one megagrow can load (its tracker
readable and naming a directory that exists, not in DeepSpeed's own format) and every file of it that
will be unpickled holds only tensors and allowlisted plain data (its pickle opcodes are listed,
nothing is unpickled: megagrow/checkpoint/safe_load.py), and --save can be written. The
tokenizer was already read by parse_args, which sizes the vocabulary from it.

One process per node (local rank 0) reads the files, since the ranks of a node see the
same ones; then all ranks agree, and the lowest failing rank reports while the others stop
quietly (megagrow.parallel.failure).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from megagrow.checkpoint.layout import TRACKER_FILENAME, iteration_dir, read_tracker
from megagrow.checkpoint.safe_load import check_file, load_dcp_metadata
from megagrow.checkpoint.torch_dist import METADATA_FILE
from megagrow.config import DataConfig, TrainConfig
from megagrow.data.blended_dataset import parse_data_path
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.errors import UserError
from megagrow.parallel.failure import raise_first_error
from megagrow.training.checkpoint_state import refuse_deepspeed_format

def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """Every torch.save file of a checkpoint directory: what megagrow may unpickle from it.

    torch_dist `.distcp` chunks are not pickles of objects; megagrow reads them with
    weights_only=True chunk by chunk (megagrow/checkpoint/torch_dist.py).
    """
    return sorted(path for path in Path(directory).rglob("*") if path.is_file() and path.suffix in (".pt", ".pth"))


def load_directory(train: TrainConfig) -> Path | None:
    """The iteration directory --load will read, None when --load holds no checkpoint."""
    if not train.load:
        return None
    root = Path(train.load)
    if root.exists() and not root.is_dir():
        raise UserError(f"--load {root}: not a directory; pass the checkpoint directory given to --save")
    iteration = read_tracker(root)  # refuses a tracker that is not a number in one line
    refuse_deepspeed_format(root)
    if iteration is None:
        if train.exit_on_missing_checkpoint:
            raise UserError(f"--load {root} holds no checkpoint (no {TRACKER_FILENAME}) and "
                            f"--exit-on-missing-checkpoint is set; fix the path or drop the flag to start from scratch")
        return None
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise UserError(f"{root / TRACKER_FILENAME}: names iteration {iteration} but {directory} does not exist; the "
                        f"checkpoint is incomplete (point the file at a complete iteration)")
    return directory


def _check_checkpoint(train: TrainConfig) -> None:
    directory = load_directory(train)
    if directory is not None:
        for path in checkpoint_files(directory):
            check_file(path)
        if (directory / METADATA_FILE).is_file():  # torch_dist: a plain pickle, read by a restricted unpickler
            load_dcp_metadata(directory / METADATA_FILE)


def _check_data(data: DataConfig) -> None:
    if data.mock_data:
        return
    for component in parse_data_path(data.data_path):
        IndexedDataset(component.prefix)


def _check_save(train: TrainConfig) -> None:
    if not train.save:
        return
    target = Path(train.save)
    if target.exists() and not target.is_dir():
        raise UserError(f"--save {target}: exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--save {target}: {existing} is not writable; choose another directory")


def _reads_files() -> bool:
    if dist.is_available() and dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    return True


def check_before_building(train: TrainConfig, data: DataConfig) -> None:
    """Collectively: data, checkpoint and save directory are usable, or the job stops with one line."""
    error = None
    if _reads_files():
        try:
            _check_data(data)
            _check_checkpoint(train)
            _check_save(train)
        except UserError as err:
            error = err
    raise_first_error(error)
