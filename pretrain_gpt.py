"""Pre-train a Llama model: `torchrun --nproc-per-node N pretrain_gpt.py ...` or `deepspeed pretrain_gpt.py ...`."""

import datetime
import logging
import os

import torch
import torch.distributed as dist

from megagrow.arguments import describe, launch_settings, parse_args
from megagrow.errors import exit_on_user_error
from megagrow.growth.in_run import train_with_growth
from megagrow.parallel import state
from megagrow.parallel.failure import stop_together
from megagrow.training.preflight import check_before_building
from megagrow.training.trainer import Trainer


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")


@exit_on_user_error
def main(argv=None):
    """Join the job's process group, parse and check the flags, train, and tear down.

    The process group comes first: from then on a mistake (a bad flag, a missing file) or a
    lost rank is reported once for the whole job, and the other ranks stop quietly.
    """
    _setup_logging()
    backend, timeout_minutes = launch_settings(argv)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    state.initialize_world(backend, timeout)
    with stop_together(timeout_minutes):
        config = parse_args(argv)
        check_before_building(config.train, config.data)
        # DeepSpeed's engine runs collectives even in a single process: give it a one-rank group.
        state.initialize_world(backend, timeout, single_process_group=config.train.deepspeed)
        state.initialize(tp=config.parallel.tp, pp=config.parallel.pp, dp=config.parallel.dp, timeout=timeout)
        logger = logging.getLogger("megagrow")
        for line in describe(config):
            logger.info("%s", line)
        if config.train.grow_at_tokens:
            train_with_growth(config.model, config.parallel, config.train, config.data)
        else:
            Trainer(config.model, config.parallel, config.train, config.data).run()
    state.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
