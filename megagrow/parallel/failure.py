"""When one rank of a job fails, every rank stops, and the job's log says why once.

Without this, one rank's one-line error is followed by every other rank's traceback from
the collective it was waiting in ("Connection closed by peer"), and a job whose ranks all
hit the same mistake prints it once per rank. Inside `stop_together()`:

- the first rank to fail claims the job's one report through the default group's store
  (an atomic counter: exactly one rank reads 1) and prints it: its UserError line, one line
  saying that a collective timed out or lost its peer, or the traceback of a bug;
- it then closes its process group, so peers waiting on it in a collective fail at once
  (gloo) instead of after --distributed-timeout-minutes;
- every later failure on any rank (the peers' broken collectives, or the same UserError)
  finds the report claimed and exits quietly.

The store lives in torchrun's agent, or in rank 0's process under other launchers; there
rank 0 waits (boundedly) for the others to stop before it exits, so they can still read the
claim. Processes leave with os._exit once the report is out: a rank whose collective timed
out still has gloo's thread blocked in it, and the interpreter's normal shutdown would abort
on that thread instead of exiting with the status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback

import torch.distributed as dist

from megagrow.errors import JobFailure, UserError, report

_CLAIMS = "megagrow/failure_reports"
_STOPPED = "megagrow/ranks_stopped"
_STORE_HOST_WAIT_S = 10.0
# Text of the errors torch raises when a collective fails (gloo and NCCL raise RuntimeError).
_COMMUNICATION_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")


class PeerStopped(Exception):
    """This rank stops because another rank reported an error; it says nothing itself."""

    exit_code = 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _default_store():
    # torch keeps the default group's store privately (no public accessor in torch 2.13).
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - without a store every rank reports: better twice than never
        return None


def _claim_report(store) -> bool:
    if store is None:
        return True
    try:
        return store.add(_CLAIMS, 1) == 1
    except Exception:  # noqa: BLE001 - the store went with rank 0's process: report
        return True


def is_communication_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed (peer gone, connection closed, timed out), not a bug."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _COMMUNICATION_WORDS)


def _torch_message(err: BaseException) -> str:
    """The first sentence of a torch/gloo error, without its source-file prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]


def describe_communication_failure(err: BaseException, rank: int, timeout_minutes: float | None) -> str:
    """One line saying which kind of collective failure stopped rank `rank`, and what to do."""
    detail = _torch_message(err)
    if "timed out" in detail.lower() or "timeout" in detail.lower():
        bound = f" {timeout_minutes:g}" if timeout_minutes is not None else ""
        return (f"rank {rank}: a collective waited longer than --distributed-timeout-minutes{bound} for another rank "
                f"({detail}); a rank is stuck or dead, so the job stops instead of hanging")
    return (f"rank {rank}: lost contact with another rank ({detail}); a rank died or was stopped without a report "
            f"(killed, out of memory?); with torchrun --max-restarts N and --load the job resumes from its last "
            f"checkpoint")


def _wait_for_peers(store, world: int) -> None:
    deadline = time.monotonic() + _STORE_HOST_WAIT_S
    while time.monotonic() < deadline:
        try:
            if store.add(_STOPPED, 0) >= world:
                return
        except Exception:  # noqa: BLE001
            return
        time.sleep(0.05)


def _stop(err: BaseException, timeout_minutes: float | None) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):  # the launcher's kill now ends this rank at once
        signal.signal(signum, signal.SIG_DFL)
    rank, world = dist.get_rank(), dist.get_world_size()
    store = _default_store()
    if isinstance(err, (UserError, PeerStopped)):
        code = err.exit_code
    elif isinstance(err, SystemExit):
        code = err.code if isinstance(err.code, int) else 1
    else:
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
    if not isinstance(err, PeerStopped) and _claim_report(store):
        if isinstance(err, UserError):
            report(err)
        elif is_communication_failure(err):
            report(JobFailure(describe_communication_failure(err, rank, timeout_minutes)))
        elif isinstance(err, KeyboardInterrupt):
            report(UserError(f"rank {rank}: interrupted"))
        elif not isinstance(err, SystemExit):
            traceback.print_exception(err)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    with contextlib.suppress(Exception):
        dist.destroy_process_group()  # peers blocked on this rank fail now, not at the timeout
    if store is not None:
        with contextlib.suppress(Exception):
            store.add(_STOPPED, 1)
        if hosts_store:
            _wait_for_peers(store, world)
    os._exit(code)


@contextlib.contextmanager
def stop_together(timeout_minutes: float | None = None):
    """Run a job's body; on any failure in a multi-process job, report it once per job and end this rank."""
    try:
        yield
    except BaseException as err:
        if not _distributed() or (isinstance(err, SystemExit) and not err.code):
            raise
        _stop(err, timeout_minutes)


def raise_first_error(error: UserError | None) -> None:
    """Collectively: if any rank passes an error, the lowest such rank raises it and every other rank stops quietly."""
    if not _distributed():
        if error is not None:
            raise error
        return
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [rank for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return
    if failed[0] == dist.get_rank():
        raise error
    raise PeerStopped(messages[failed[0]])
