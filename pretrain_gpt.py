"""Pre-train a Llama model: `torchrun --nproc-per-node N pretrain_gpt.py ...` or `deepspeed pretrain_gpt.py ...`."""

import datetime
import logging
import os

import torch
import torch.distributed as dist

from megagrow.arguments import describe, parse_args
from megagrow.errors import UserError, exit_on_user_error
from megagrow.growth.in_run import train_with_growth
from megagrow.parallel import state
from megagrow.checkpoint.layout import TRACKER_FILENAME, read_tracker
from megagrow.training.trainer import Trainer


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")


def _refuse_missing_checkpoint(train) -> None:
    # Megatron's --exit-on-missing-checkpoint: a mistyped --load must not quietly start a fresh run.
    if train.exit_on_missing_checkpoint and train.load and read_tracker(train.load) is None:
        raise UserError(f"--load {train.load} holds no checkpoint (no {TRACKER_FILENAME}) and "
                        f"--exit-on-missing-checkpoint is set; fix the path or drop the flag to start from scratch")


@exit_on_user_error
def main(argv=None):
    """Parse flags, set up the process groups, train, and tear down."""
    _setup_logging()
    config = parse_args(argv)
    _refuse_missing_checkpoint(config.train)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp,
                     backend=config.train.distributed_backend,
                     timeout=datetime.timedelta(minutes=config.train.distributed_timeout_minutes))
    try:
        logging.getLogger("megagrow").info("configuration\n%s", describe(config))
        if config.train.grow_at_tokens:
            train_with_growth(config.model, config.parallel, config.train, config.data)
        else:
            Trainer(config.model, config.parallel, config.train, config.data).run()
    finally:
        state.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
