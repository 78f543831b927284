"""Pre-train a Llama model: `torchrun --nproc-per-node N pretrain_gpt.py ...` or `deepspeed pretrain_gpt.py ...`."""

import logging
import os

import torch
import torch.distributed as dist

from megagrow.arguments import describe, parse_args
from megagrow.errors import exit_on_user_error
from megagrow.growth.in_run import train_with_growth
from megagrow.parallel import state
from megagrow.training.trainer import Trainer


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")


@exit_on_user_error
def main(argv=None):
    """Parse flags, set up the process groups, train, and tear down."""
    _setup_logging()
    config = parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp)
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
