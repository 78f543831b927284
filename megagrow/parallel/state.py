"""Process groups for tensor (tp), pipeline (pp) and data (dp) parallelism.

Rank layout (Megatron's order: tp varies fastest, then dp, then pp):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the ranks of one tensor-parallel group are adjacent (one node, fast links), data-parallel
replicas of a shard sit tp apart, and pipeline stages are the slowest-varying coordinate.
Example, tp=2 dp=2 pp=2 (8 ranks):

    rank       0 1 2 3 4 5 6 7
    tp_rank    0 1 0 1 0 1 0 1
    dp_rank    0 0 1 1 0 0 1 1
    pp_rank    0 0 0 0 1 1 1 1

    tp groups  [0,1] [2,3] [4,5] [6,7]
    dp groups  [0,2] [1,3] [4,6] [5,7]
    pp groups  [0,4] [1,5] [2,6] [3,7]
    embedding  [0,4] [1,5] [2,6] [3,7]   (first and last stage of each pp group)

Without `initialize` (or after `initialize(1, 1, 1)` in a plain process) every size is 1,
every rank 0 and every group None: models then run with no torch.distributed at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagrow.errors import UserError


@dataclass(frozen=True)
class ParallelCoordinates:
    """Where one rank sits in the (tp, dp, pp) grid."""

    tp_rank: int
    dp_rank: int
    pp_rank: int


def rank_to_coordinates(rank: int, tp: int, pp: int, dp: int) -> ParallelCoordinates:
    """Grid coordinates of a global rank."""
    return ParallelCoordinates(tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp))


def coordinates_to_rank(coords: ParallelCoordinates, tp: int, pp: int, dp: int) -> int:
    """Global rank at grid coordinates."""
    return coords.pp_rank * dp * tp + coords.dp_rank * tp + coords.tp_rank


@dataclass
class _Groups:
    tp: int
    pp: int
    dp: int
    coords: ParallelCoordinates
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    embedding_group: dist.ProcessGroup | None
    mp_group: dist.ProcessGroup | None
    pp_ranks: list[int]
    embedding_ranks: list[int]


_GROUPS: _Groups | None = None


def _group_rank_lists(tp: int, pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Every tp / dp / pp / embedding group as lists of global ranks, in creation order."""
    rank = lambda t, d, p: coordinates_to_rank(ParallelCoordinates(t, d, p), tp, pp, dp)  # noqa: E731
    tp_groups = [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    embedding_groups = [sorted({ranks[0], ranks[-1]}) for ranks in pp_groups]
    # One whole model replica (all its tp shards and pipeline stages): DeepSpeed's "model
    # parallel" group, over which it completes gradient norms.
    mp_groups = [sorted(rank(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "embedding": embedding_groups, "mp": mp_groups}


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _elastic_attempt_store(timeout: datetime.timedelta | None):
    """A store for this torchrun attempt's keys only, or None when not restarted by torchelastic."""
    # torch behaviour worked around (torch 2.13, torch.distributed.rendezvous._create_c10d_store):
    # with TORCHELASTIC_USE_AGENT_STORE=True every worker connects to the agent's TCPStore with no
    # per-attempt prefix ("a new TCPStore for every retry"), but the static and c10d rendezvous
    # handlers keep ONE store for the agent's whole life. After `torchrun --max-restarts` restarts
    # the workers, the default group's keys still hold the dead attempt's gloo addresses: a new
    # rank reads its peer's stale address before the peer overwrites it and fails with "Gloo
    # connectFullMesh failed ... Connection refused" (or NCCL reads a stale unique id). Keys under
    # a prefix named by TORCHELASTIC_RESTART_COUNT (the same on every rank of one attempt) are
    # fresh on every restart; this is the prefix older torch releases used themselves.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False,
                          timeout=timeout or datetime.timedelta(minutes=10))
    return dist.PrefixStore(f"megagrow/attempt_{attempt}", store)


def initialize_world(backend: str | None = None, timeout: datetime.timedelta | None = None, *,
                     single_process_group: bool = False) -> None:
    """Create the default process group from the launcher's environment (torchrun, deepspeed), if there is one.

    A single process with no launcher needs none, unless `single_process_group` asks for a
    one-rank group (DeepSpeed's engine runs collectives even alone). `backend` defaults to
    nccl with CUDA and gloo without; `timeout` bounds every collective of the group.
    """
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not single_process_group:
        return
    backend = backend or _default_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("--distributed-backend nccl needs CUDA GPUs and this machine has none; "
                            "use --distributed-backend gloo")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    bounded = {"timeout": timeout} if timeout is not None else {}  # older torch refuses timeout=None
    if world_size == 1:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **bounded)
        return
    store = _elastic_attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend=backend, **bounded)
    else:
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                                **bounded)


def initialize(tp: int = 1, pp: int = 1, dp: int | None = None, *, backend: str | None = None,
               timeout: datetime.timedelta | None = None) -> None:
    """Create the tp / pp / dp / embedding process groups; dp=None takes what the world size leaves.

    Uses the default process group if one exists, else creates it with `initialize_world`.
    `timeout` bounds every collective of the default group and of the groups made here
    (torch gives new groups its own default, not the world's, unless told).
    """
    global _GROUPS
    if _GROUPS is not None:
        raise RuntimeError("parallel state is already initialized; call destroy() first")
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp if dp is not None else 1)):
        if size < 1:
            raise UserError(f"parallel sizes must be positive, got {name}={size}")
    bounded = {"timeout": timeout} if timeout is not None else {}  # older torch refuses timeout=None
    initialize_world(backend, timeout)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if dp is None:
        dp = max(world_size // (tp * pp), 1)
    if world_size != tp * pp * dp:
        raise UserError(f"world size {world_size} != tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp}; "
                        f"launch {tp * pp * dp} processes or change the parallel sizes")
    rank = dist.get_rank() if dist.is_initialized() else 0
    coords = rank_to_coordinates(rank, tp, pp, dp)
    if not dist.is_initialized():
        _GROUPS = _Groups(1, 1, 1, coords, None, None, None, None, None, [0], [0])
        return
    # new_group is collective over the whole world: every rank creates every group, in the
    # same order, and keeps the ones it belongs to.
    mine: dict[str, dist.ProcessGroup] = {}
    my_ranks: dict[str, list[int]] = {}
    for kind, rank_lists in _group_rank_lists(tp, pp, dp).items():
        for ranks in rank_lists:
            group = dist.new_group(ranks, **bounded)
            if rank in ranks:
                mine[kind], my_ranks[kind] = group, ranks
    # Middle pipeline stages hold no embedding and belong to no embedding group.
    _GROUPS = _Groups(tp, pp, dp, coords, mine["tp"], mine["pp"], mine["dp"], mine.get("embedding"), mine["mp"],
                      my_ranks["pp"], my_ranks.get("embedding", []))


def destroy() -> None:
    """Forget the groups (the default process group is left to whoever created it)."""
    global _GROUPS
    if _GROUPS is not None and dist.is_initialized():
        for group in {_GROUPS.tp_group, _GROUPS.pp_group, _GROUPS.dp_group, _GROUPS.embedding_group,
                      _GROUPS.mp_group}:
            if group is not None:
                dist.destroy_process_group(group)
    _GROUPS = None


def is_initialized() -> bool:
    """Whether `initialize` has run (and `destroy` has not)."""
    return _GROUPS is not None


def _get(attribute: str, default):
    return default if _GROUPS is None else getattr(_GROUPS, attribute)


def tp_size() -> int:
    """Tensor-parallel world size."""
    return _get("tp", 1)


def pp_size() -> int:
    """Pipeline-parallel world size (number of stages)."""
    return _get("pp", 1)


def dp_size() -> int:
    """Data-parallel world size (number of model replicas)."""
    return _get("dp", 1)


def tp_rank() -> int:
    """This rank's index in its tensor-parallel group."""
    return 0 if _GROUPS is None else _GROUPS.coords.tp_rank


def pp_rank() -> int:
    """This rank's pipeline stage."""
    return 0 if _GROUPS is None else _GROUPS.coords.pp_rank


def dp_rank() -> int:
    """This rank's index in its data-parallel group."""
    return 0 if _GROUPS is None else _GROUPS.coords.dp_rank


def tp_group() -> dist.ProcessGroup | None:
    """Tensor-parallel group (None in a single process)."""
    return _get("tp_group", None)


def pp_group() -> dist.ProcessGroup | None:
    """Pipeline group: the stages holding the same tp shard of the same replica."""
    return _get("pp_group", None)


def dp_group() -> dist.ProcessGroup | None:
    """Data-parallel group: the replicas of this rank's (tp, pp) shard."""
    return _get("dp_group", None)


def embedding_group() -> dist.ProcessGroup | None:
    """First and last pipeline stage of this pp group, which sum tied-embedding grads (None on middle stages)."""
    return _get("embedding_group", None)


def mp_group() -> dist.ProcessGroup | None:
    """Model-parallel group: every tp shard and pipeline stage of this rank's replica."""
    return _get("mp_group", None)


def mp_rank() -> int:
    """This rank's index in its model-parallel group (tp fastest, then pp)."""
    return pp_rank() * tp_size() + tp_rank()


def pp_group_ranks() -> list[int]:
    """Global ranks of this rank's pipeline group, stage 0 first (for point-to-point sends)."""
    return list(_get("pp_ranks", [0]))


def embedding_group_ranks() -> list[int]:
    """Global ranks of this rank's embedding group (empty on middle pipeline stages)."""
    return list(_get("embedding_ranks", [0]))


def is_first_stage() -> bool:
    """Whether this rank holds the first pipeline stage (the embedding)."""
    return pp_rank() == 0


def is_last_stage() -> bool:
    """Whether this rank holds the last pipeline stage (final norm, output head, loss)."""
    return pp_rank() == pp_size() - 1
