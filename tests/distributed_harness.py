"""Run a function in N gloo worker processes on 127.0.0.1 and collect what each returns.

    results = run_distributed(fn, 2, arg)   # fn(arg) on ranks 0 and 1, results[rank]

`fn` must be picklable (defined at module level). Each worker gets torch.distributed already
initialised (gloo, world_size workers, one CPU thread) and returns any picklable value. If a
worker raises, the same exception is raised here with the worker's traceback as its cause,
and the other workers are stopped instead of waiting for a collective that never comes.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker."""

    def __str__(self) -> str:
        return self.args[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, timeout_s, fn, args, kwargs, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(*args, **kwargs)
        results.put((rank, True, pickle.dumps(value), None))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            payload = None
        results.put((rank, False, payload, text))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, daemon: bool = True, **kwargs) -> list:
    """Call fn(*args, **kwargs) on `world_size` gloo ranks; return their results ordered by rank.

    `daemon=False` lets workers start processes of their own (megatron-core's checkpoint writer forks).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before torch loads
    try:
        workers = [context.Process(target=_worker, args=(rank, world_size, port, timeout_s, fn, args, kwargs, results),
                                   daemon=daemon) for rank in range(world_size)]
        for worker in workers:
            worker.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads

    collected: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, ok, payload, text = results.get(timeout=0.5)
            except queue_module.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker exited with code {dead[0].exitcode} without reporting a result")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size - len(collected)} worker(s) gave no result in {timeout_s:.0f} s")
                continue
            if not ok:
                error = pickle.loads(payload) if payload is not None else RuntimeError(f"rank {rank} failed")
                raise error from RemoteTraceback(f"\n\nrank {rank} traceback:\n{text}")
            collected[rank] = pickle.loads(payload)
    finally:
        # After a failure the others may be blocked in a collective: stop them, do not wait.
        grace_s = 10 if len(collected) == world_size else 0
        for worker in workers:
            worker.join(timeout=grace_s)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return [collected[rank] for rank in range(world_size)]
