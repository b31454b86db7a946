"""Stall decisions of a download, driven with plain data: when bytes last moved, which fetches are in flight."""

import random

import pytest

from damselfly.config import DaemonConfig
from damselfly.daemon.planner import Outcome, Parent, Planner, Stall, fetch_stalled
from damselfly.plugins.picker.pickers import SequentialPicker

pytestmark = pytest.mark.timeout(10)


def planner(**settings) -> Planner:
    cfg = DaemonConfig(**{"concurrent_pieces": 2, "endgame_duplicates": 0, "stall_timeout": 10.0, **settings})
    return Planner(cfg, SequentialPicker(), random.Random(7))


def parent(p: Planner, peer_id: str, pieces=()) -> Parent:
    par = Parent(peer_id)
    assert p.add(par)
    for n in pieces:
        p.reported(par, n, 0.0)
    return par


def held(**settings) -> Planner:
    """A planner whose one parent holds the missing piece 0 (so a download without progress has stalled)."""
    p = planner(**settings)
    parent(p, "holder", [0])
    return p


def test_a_download_that_moved_bytes_lately_has_not_stalled():
    p = held()
    assert p.stall(0.0, {0}) is Stall.NONE
    p.progressed(5.0)
    assert p.stall(14.0, {0}) is Stall.NONE


def test_a_download_idle_for_the_stall_timeout_first_asks_for_other_parents():
    p = held()
    p.stall(0.0, {0})
    assert p.stall(10.0, {0}) is Stall.RESCHEDULE


def test_a_stalled_download_waits_a_second_period_after_rescheduling_then_fails():
    p = held()
    p.stall(0.0, {0})
    assert p.stall(10.0, {0}) is Stall.RESCHEDULE
    p.new_round()  # the scheduler's other parents: the stall is remembered across rounds
    parent(p, "another", [0])
    assert p.stall(15.0, {0}) is Stall.NONE
    assert p.stall(20.0, {0}) is Stall.FAIL


def test_progress_after_a_reschedule_starts_the_stall_clock_again():
    p = held()
    p.stall(0.0, {0})
    assert p.stall(10.0, {0}) is Stall.RESCHEDULE
    p.progressed(12.0)
    assert p.stall(21.0, {0}) is Stall.NONE
    assert p.stall(22.0, {0}) is Stall.RESCHEDULE


def test_a_download_waiting_for_pieces_no_parent_holds_yet_asks_again_each_schedule_timeout_and_never_fails():
    p = planner(schedule_timeout=30.0)
    parent(p, "seed-still-reading", [])
    p.stall(0.0, {0})
    assert p.stall(20.0, {0}) is Stall.NONE  # past stall_timeout, but nothing to stall on
    assert p.stall(30.0, {0}) is Stall.RESCHEDULE
    assert p.stall(59.0, {0}) is Stall.NONE
    assert p.stall(60.0, {0}) is Stall.RESCHEDULE


def test_a_fetch_stalls_once_no_bytes_moved_for_the_stall_timeout():
    assert not fetch_stalled(last_moved=3.0, now=12.9, stall_timeout=10.0)
    assert fetch_stalled(last_moved=3.0, now=13.0, stall_timeout=10.0)


def test_a_stalled_fetch_sends_the_piece_to_another_holder():
    p = planner()
    slow = parent(p, "slow", [0])
    other = parent(p, "other", [0])
    [first] = p.plan({0}, 0.0, sharing=False).starts
    p.ended(first, Outcome.STALLED, 10.0)
    [again] = p.plan({0}, 10.0, sharing=False).starts
    assert {first.parent_id, again.parent_id} == {slow.peer_id, other.peer_id}


def test_a_stalled_sole_holder_is_not_asked_for_that_piece_again_for_a_stall_period():
    p = planner(busy_backoff=1.0)
    parent(p, "only", [0, 1])
    starts = p.plan({0}, 0.0, sharing=False).starts
    p.ended(starts[0], Outcome.STALLED, 10.0)
    assert p.plan({0}, 15.0, sharing=False).starts == []
    assert [f.number for f in p.plan({0}, 20.0, sharing=False).starts] == [0]


def test_the_stall_reason_names_the_pieces_awaited_the_parents_and_the_time():
    p = planner()
    parent(p, "peer-a", [0, 1])
    p.progressed(0.0)
    p.plan({0, 1, 2}, 0.0, sharing=False)
    why = p.stall_reason({0, 1, 2}, 12.0)
    assert why == "no piece data moved for 12s; waited for pieces 0,1 from peer-a; pieces 2 that no parent holds"


def test_the_stall_reason_shortens_a_long_list_of_pieces():
    p = planner()
    parent(p, "peer-a", range(20))
    p.progressed(0.0)
    assert "pieces 0,1,2,3,4,5,6,7 (+12 more) from peer-a" in p.stall_reason(set(range(20)), 10.0)


def test_a_fetch_in_flight_holds_off_the_download_stall_until_it_stalls_itself():
    p = planner()
    parent(p, "slow", [0])
    p.stall(0.0, {0})
    [fetch] = p.plan({0}, 0.0, sharing=False).starts
    assert p.stall(10.0, {0}) is Stall.NONE  # the fetch's own stall check ends it first
    p.ended(fetch, Outcome.STALLED, 10.0)
    assert p.plan({0}, 10.0, sharing=False).starts == []  # its sole holder is not asked again yet
    assert p.stall(10.0, {0}) is Stall.RESCHEDULE
