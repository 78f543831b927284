"""Process groups: Megatron's rank order, group membership, single-process defaults, clear errors."""

import pytest
import torch
import torch.distributed as dist

from distributed_harness import run_distributed
from megagrow.errors import UserError
from megagrow.parallel import state
from megagrow.parallel.state import coordinates_to_rank, rank_to_coordinates


def test_rank_order_is_tp_then_dp_then_pp():
    tp, pp, dp = 2, 2, 2
    coords = [rank_to_coordinates(rank, tp, pp, dp) for rank in range(8)]
    assert [c.tp_rank for c in coords] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [c.dp_rank for c in coords] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [c.pp_rank for c in coords] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(coordinates_to_rank(c, tp, pp, dp) == rank for rank, c in enumerate(coords))


def test_group_lists_match_the_documented_example():
    groups = state._group_rank_lists(tp=2, pp=2, dp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert state._group_rank_lists(tp=2, pp=1, dp=1)["embedding"] == [[0], [1]]
    assert state._group_rank_lists(tp=1, pp=3, dp=1)["embedding"] == [[0, 2]]  # the middle stage has none


def test_uninitialized_state_is_a_single_process():
    assert not state.is_initialized()
    assert (state.tp_size(), state.pp_size(), state.dp_size()) == (1, 1, 1)
    assert (state.tp_rank(), state.pp_rank(), state.dp_rank()) == (0, 0, 0)
    assert state.tp_group() is None and state.is_first_stage() and state.is_last_stage()


def test_initialize_without_torch_distributed():
    state.initialize(1, 1, 1)
    try:
        assert state.is_initialized() and state.tp_size() == 1 and state.tp_group() is None
    finally:
        state.destroy()
    with pytest.raises(UserError, match=r"world size 1 != tp\*pp\*dp"):
        state.initialize(2, 1, 1)
    assert not state.is_initialized()


def _describe_groups(tp, pp, dp):
    state.initialize(tp, pp, dp)
    try:
        rank_sum = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(rank_sum, group=state.tp_group())
        return {
            "coords": (state.tp_rank(), state.dp_rank(), state.pp_rank()),
            "tp": dist.get_process_group_ranks(state.tp_group()),
            "dp": dist.get_process_group_ranks(state.dp_group()),
            "pp": dist.get_process_group_ranks(state.pp_group()),
            "embedding": state.embedding_group_ranks(),
            "stage": (state.is_first_stage(), state.is_last_stage()),
            "tp_rank_sum": rank_sum.item(),
        }
    finally:
        state.destroy()


def _describe_two_layouts():
    return [_describe_groups(2, 2, 1), _describe_groups(2, 1, 2)]


def test_groups_on_four_ranks():
    results = run_distributed(_describe_two_layouts, 4)
    pipeline = [r[0] for r in results]
    assert [r["coords"] for r in pipeline] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert [r["tp"] for r in pipeline] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp"] for r in pipeline] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["embedding"] for r in pipeline] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["stage"] for r in pipeline] == [(True, False), (True, False), (False, True), (False, True)]
    assert [r["tp_rank_sum"] for r in pipeline] == [1.0, 1.0, 5.0, 5.0]
    data = [r[1] for r in results]
    assert [r["dp"] for r in data] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["coords"] for r in data] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert all(r["stage"] == (True, True) for r in data)


def _initialize_too_large():
    state.initialize(tp=2, pp=2, dp=1)


def test_world_size_mismatch_is_one_clear_line():
    with pytest.raises(UserError) as raised:
        run_distributed(_initialize_too_large, 2)
    message = str(raised.value)
    assert "\n" not in message
    assert "world size 2 != tp*pp*dp = 2*2*1 = 4" in message
    # The harness re-raises the worker's own exception with its traceback attached.
    assert "_initialize_too_large" in str(raised.value.__cause__)
