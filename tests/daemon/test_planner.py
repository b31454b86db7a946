"""The piece-choice policy of a download, driven with plain data: parents, pieces, times, a seeded random."""

import random

import pytest

from damselfly.config import DaemonConfig
from damselfly.daemon.planner import (
    DECLINED_BACKOFF,
    SEED_HOLDER,
    Fetch,
    Outcome,
    Parent,
    Planner,
    endgame,
    endgame_order,
    fetch_slots,
    holders,
    parent_weight,
    source_runs,
)
from damselfly.plugins.picker.pickers import SequentialPicker


class RecordingPicker(SequentialPicker):
    """Sequential order; remembers the holders it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[int, float]] = []

    def order(self, missing: set[int], holders: dict[int, float]) -> list[int]:
        self.seen.append(dict(holders))
        return super().order(missing, holders)


class LastChoice(random.Random):
    """Picks the last candidate, and remembers the weights it was offered."""

    def __init__(self) -> None:
        super().__init__(0)
        self.weights: list[list[float]] = []

    def choices(self, population, weights=None, *, cum_weights=None, k=1):  # type: ignore[override]
        self.weights.append(list(weights))
        return [population[-1]]


def planner(rng: random.Random | None = None, picker=None, **settings) -> Planner:
    cfg = DaemonConfig(**{"concurrent_pieces": 2, "seed_extra_pieces": 1, "endgame_duplicates": 0, **settings})
    return Planner(cfg, picker or SequentialPicker(), rng or random.Random(7))


def parent(p: Planner, peer_id: str, pieces=(), *, seed: bool = False, weight: float = 1.0, now: float = 0.0):
    par = Parent(peer_id, weight=weight, is_seed=seed)
    assert p.add(par)
    for n in pieces:
        p.reported(par, n, now)
    return par


def started(plan) -> list[tuple[int, str]]:
    return [(f.number, f.parent_id) for f in plan.starts]


# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numbers", "width", "runs"),
    [
        (list(range(8)), 1, [list(range(8))]),  # one read of the whole task
        (list(range(8)), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (list(range(5)), 4, [[0], [1], [2], [3, 4]]),
        (list(range(3)), 8, [[0], [1], [2]]),  # never more runs than pieces
        ([0, 1, 5, 6, 7, 9], 1, [[0, 1], [5, 6, 7], [9]]),  # gaps always split (what is stored is not read)
        ([], 4, []),
    ],
)
def test_missing_pieces_become_at_most_width_runs_of_consecutive_pieces(numbers, width, runs):
    assert source_runs(numbers, width) == runs


@pytest.mark.parametrize(
    ("in_flight", "from_seeds", "settings", "sharing", "full"),
    [
        (5, 0, {}, False, (False, False)),
        (6, 0, {}, False, (True, False)),  # ordinary slots full: only a seed may be asked now
        (7, 1, {}, False, (True, True)),  # and its one extra slot taken
        (6, 1, {}, False, (False, False)),  # the seed's fetch is in the extra slot
        (7, 7, {}, False, (True, True)),  # fetches from seeds beyond the extra one take ordinary slots
        (6, 6, {"seed_extra_pieces": 0}, False, (True, True)),
        (4, 0, {"share_concurrent_pieces": 4}, True, (True, False)),  # a share being read holds two back
        (4, 0, {"share_concurrent_pieces": 4}, False, (False, False)),  # and gives them back when it is in
        (5, 1, {"share_concurrent_pieces": 4}, True, (True, True)),
        (5, 0, {"share_concurrent_pieces": 8}, True, (False, False)),  # never more than concurrent_pieces
        (6, 0, {"share_concurrent_pieces": 8}, True, (True, False)),
    ],
)
def test_fetch_slots_count_the_extra_seed_slot_and_hold_some_back_while_a_share_is_read(
    in_flight, from_seeds, settings, sharing, full
):
    cfg = DaemonConfig(**{"concurrent_pieces": 6, "seed_extra_pieces": 1, **settings})
    assert fetch_slots(in_flight, from_seeds, cfg, sharing=sharing) == full


@pytest.mark.parametrize(
    ("missing", "in_flight", "expected"),
    [
        ({3, 4}, [3, 4], True),  # every missing piece is being fetched: the endgame
        ({3, 4}, [3, 4, 4], True),
        ({4}, [3, 4], True),  # piece 3 is in but its fetch not yet reaped
        ({3, 4, 5}, [3, 4], False),  # piece 5 is held by no parent yet: mid-download, no duplicates
        ({3, 4}, [], False),
    ],
)
def test_the_endgame_begins_only_once_every_missing_piece_is_in_flight(missing, in_flight, expected):
    fetches = [Fetch(n, f"parent{i}", False, 0.0) for i, n in enumerate(in_flight)]
    assert endgame(missing, fetches) is expected


def test_endgame_copies_go_first_to_the_pieces_in_flight_longest_and_not_yet_copied():
    fetches = [
        Fetch(1, "a", False, 5.0),
        Fetch(2, "a", False, 1.0),
        Fetch(3, "b", False, 3.0),
        Fetch(3, "c", False, 4.0),
    ]
    assert endgame_order(fetches, 1) == [2, 1]  # piece 3 has its copy already
    assert endgame_order(fetches, 2) == [2, 3, 1]


def test_a_seed_counts_half_a_holder_and_a_parent_weighs_its_free_upload():
    peer, seed = Parent("p", pieces={1, 2}), Parent("s", pieces={2}, is_seed=True)
    assert holders([peer, seed]) == {1: 1, 2: 1 + SEED_HOLDER}
    assert parent_weight(100, 30) == 70.0
    assert parent_weight(10, 30) == 1.0  # never nothing: a saturated parent may still be chosen


# -- the planner ----------------------------------------------------------------------------


def test_pieces_go_to_holders_in_the_pickers_order_up_to_the_free_slots():
    p = planner()
    parent(p, "a", [0, 1, 2])
    plan = p.plan({0, 1, 2}, 1.0, sharing=False)
    assert started(plan) == [(0, "a"), (1, "a")]  # concurrent_pieces=2
    assert plan.full is False  # the seed's extra slot is free
    assert p.load == {"a": 2}


def test_a_piece_goes_to_the_least_loaded_holder_then_at_random_weighted_by_free_upload():
    rng = LastChoice()
    p = planner(rng, concurrent_pieces=4)
    parent(p, "a", [0, 1], weight=5.0)
    parent(p, "b", [1], weight=2.0)
    parent(p, "c", [1], weight=0.0)
    plan = p.plan({0, 1}, 1.0, sharing=False)
    # piece 0: only a holds it; piece 1: a is busy with piece 0, so b and c, weighted (a zero weight kept just above 0)
    assert started(plan) == [(0, "a"), (1, "c")]
    assert rng.weights == [[5.0], [2.0, 1e-9]]


def test_the_random_choice_is_the_injected_generators():
    def choose(seed: int) -> list[str]:
        p = planner(random.Random(seed), concurrent_pieces=8)
        for name in "abcd":
            parent(p, name, range(8))
        return [f.parent_id for f in p.plan(set(range(8)), 1.0, sharing=False).starts]

    assert choose(1) == choose(1)
    assert len({tuple(choose(seed)) for seed in range(6)}) > 1


def test_a_busy_parent_is_asked_again_after_its_backoff_or_as_soon_as_a_fetch_from_it_ends():
    p = planner(busy_backoff=0.2)
    a = parent(p, "a", [0, 1])
    first = p.plan({0, 1}, 1.0, sharing=False)
    one, two = first.starts
    p.busy(a, 1.0)
    p.ended(one, Outcome.BUSY)
    plan = p.plan({0, 1}, 1.0, sharing=False)
    assert plan.starts == [] and plan.wait == pytest.approx(0.2)  # asked again when its backoff ends
    p.ended(two, Outcome.STORED)  # a fetch from it ended: one of its slots is free
    assert started(p.plan({0}, 1.05, sharing=False)) == [(0, "a")]


def test_a_declined_piece_is_asked_of_another_parent_and_of_the_same_one_after_the_backoff():
    p = planner()
    a = parent(p, "a", [0])
    (fetch,) = p.plan({0}, 1.0, sharing=False).starts
    p.declined(a, 0, 1.0)
    p.ended(fetch, Outcome.DECLINED)
    plan = p.plan({0}, 1.0, sharing=False)
    assert plan.starts == [] and plan.wait == pytest.approx(DECLINED_BACKOFF)
    b = parent(p, "b", [0])
    assert started(p.plan({0}, 1.0, sharing=False)) == [(0, b.peer_id)]
    assert p.tried[0] == {"b"}


def test_a_parent_that_failed_a_piece_is_not_asked_for_it_again_while_others_are_syncing():
    p = planner()
    parent(p, "a", [0])
    parent(p, "b", [])  # still syncing: it may report piece 0 later
    (fetch,) = p.plan({0}, 1.0, sharing=False).starts
    p.ended(fetch, Outcome.FAILED)
    assert p.tried == {0: {"a"}}
    plan = p.plan({0}, 2.0, sharing=False)
    assert plan.starts == [] and plan.give_up is None
    assert p.tried == {}  # nothing in flight: a parent may be asked again on the next pass
    assert started(p.plan({0}, 3.0, sharing=False)) == [(0, "a")]


def test_a_gather_window_lets_the_other_parents_report_a_piece_before_one_is_chosen():
    p = planner(parent_gather_window=0.5)
    parent(p, "a", [0], now=1.0)
    parent(p, "b", [])  # still syncing
    plan = p.plan({0}, 1.1, sharing=False)
    assert plan.starts == [] and plan.wait == pytest.approx(0.4)
    assert started(p.plan({0}, 1.6, sharing=False)) == [(0, "a")]


def test_with_the_ordinary_slots_full_only_a_seed_is_asked_and_it_takes_the_extra_slot():
    p = planner(concurrent_pieces=1)
    parent(p, "peer", [0, 1, 2])
    parent(p, "seed", [2], seed=True)
    plan = p.plan({0, 1, 2}, 1.0, sharing=False)
    assert started(plan) == [(0, "peer"), (2, "seed")]
    assert plan.full is True
    assert [f.from_seed for f in plan.starts] == [False, True]


def test_the_endgame_fetches_a_piece_in_flight_once_more_from_another_holder_staged():
    p = planner(concurrent_pieces=4, endgame_duplicates=1)
    parent(p, "a", [0, 1])
    plan = p.plan({0, 1}, 1.0, sharing=False)
    assert started(plan) == [(0, "a"), (1, "a")]
    parent(p, "b", [1])
    again = p.plan({0, 1}, 2.0, sharing=False)
    assert [(f.number, f.parent_id, f.staged) for f in again.starts] == [(1, "b", True)]
    assert again.starts[0].from_seed is False
    winner = again.starts[0]
    assert p.others(winner) == [plan.starts[1]]  # the loser to cancel once the copy is in


def test_a_download_gives_up_on_its_parents_once_every_one_synced_and_none_has_a_missing_piece():
    p = planner()
    a = parent(p, "a", [0])
    b = parent(p, "b", [0])
    a.synced = b.synced = True
    p.block("a")
    p.failed(b)
    plan = p.plan({0, 1}, 1.0, sharing=False)
    assert plan.give_up == "2 pieces missing and no live parent has them (2 of 2 parents failed)"
    assert p.plan({0, 1}, 1.0, sharing=True).give_up is None  # a share being read is progress
    p.new_round()
    assert not p.add(Parent("a")) and p.add(Parent("b"))  # a blocklisted parent is not taken on again


def test_the_picker_sees_each_pieces_holders_kept_up_to_date_as_parents_report():
    picker = RecordingPicker()
    p = planner(picker=picker)
    parent(p, "a", [0])
    seed = parent(p, "s", [], seed=True)
    p.plan({0, 1}, 1.0, sharing=False)
    p.reported(seed, 1, 1.0)
    p.plan({0, 1}, 1.0, sharing=True)
    assert picker.seen == [{0: 1}, {0: 1, 1: SEED_HOLDER}]


def test_a_new_round_forgets_its_parents_but_not_the_blocklist_nor_when_pieces_were_first_seen():
    p = planner()
    parent(p, "a", [0], now=3.0)
    p.block("b")
    p.plan({0}, 4.0, sharing=False)
    p.new_round()
    assert (p.parents, p.fetches, p.load, p.tried) == ({}, [], {}, {})
    assert p.blocklist == {"b"} and p.first_seen == {0: 3.0}
