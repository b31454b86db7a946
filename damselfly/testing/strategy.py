"""The strategy conformance kit: the cases every scheduling strategy passes.

A strategy package subclasses ``StrategyConformance`` in its tests and provides a
``strategy`` fixture returning an instance of its plugin:

    from damselfly.testing.strategy import StrategyConformance

    class TestMyStrategy(StrategyConformance):
        @pytest.fixture
        def strategy(self):
            return MyStrategy()

The scheduler hands a strategy only peers that may serve the child (on another host, in
a state to serve, holding the child's range, not below it in a DAG, not blocked); the
strategy orders them, best first, and the scheduler takes the first ``parent_limit``.
So a ranking holds only candidates it was handed, each once, never the child itself;
by default all of them (``keeps_every_candidate = False`` for a strategy that leaves
some out). A strategy is a pure function of what it is handed: it changes none of it,
and the same swarm ranks the same whatever Python's ``random`` holds, unless the class
sets ``randomized = True`` (it draws from ``random``): then the kit seeds ``random``
and asks for the same ranking under the same seed.

Cases: swarms of every kind of host (seeds of each type and state, idle, busy, with
no bandwidth reported, near and far, with and without pieces), no candidate, one,
and a thousand; the class's ``dag``, ``parent_limit`` and ``Config`` as the scheduler
reads them.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from damselfly.contracts import Candidate, Strategy
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.core.task import Task

GBIT = 1_000_000_000
TASK = Task(id="5a" * 32, url="http://o/x", content_length=1 << 30, piece_length=4 << 20)
IDCS = ("", "idc-1", "IDC-1", "idc-2")
LOCATIONS = ("", "asia|cn|hz|rack1", "asia|cn|hz|rack2", "ASIA|cn|sh", "eu", "a|b|c|d|e|f|g")
SERVING = (PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED)


def candidate(rng: random.Random, name: str, *, task: Task = TASK) -> Candidate:
    """A peer of ``task`` on its own host, of a kind drawn from ``rng``: a seed of any type
    one time in five, loads from idle to past the link's rate, no bandwidth reported at all
    now and then, any IDC and location, and from none to every piece."""
    host = Host(
        id=f"{name}-host",
        ip="127.0.0.1",
        hostname=name,
        port=65000,
        type=rng.choice(list(HostType)) if rng.random() < 0.2 else HostType.NORMAL,
        idc=rng.choice(IDCS),
        location=rng.choice(LOCATIONS),
        max_tx_bandwidth=rng.choice([0, 100_000_000, GBIT, 10 * GBIT]),
        tx_bandwidth=rng.choice([0, GBIT // 3, GBIT, 20 * GBIT]),
        upload_content_length=rng.choice([0, GBIT // 8 * 15, GBIT * 60]),
        concurrent_upload_pieces=rng.choice([0, 1, 8, 200]),
    )
    peer = Peer(id=f"{name}-peer", task_id=task.id, host_id=host.id, state=rng.choice(SERVING))
    peer.finished_pieces.update(range(rng.choice([0, 1, task.piece_count // 2, task.piece_count])))
    peer.parents.update(f"p{i}-peer" for i in range(rng.randrange(3)))
    peer.children.update(f"c{i}-peer" for i in range(rng.randrange(3)))
    for _ in range(rng.randrange(4)):
        peer.add_cost(rng.uniform(0.01, 2.0))
    return Candidate(peer, host)


def swarm(seed: int, size: int) -> tuple[Candidate, list[Candidate]]:
    """A child (a running normal peer) and ``size`` candidate parents, the same for one ``seed``."""
    rng = random.Random(seed)
    child = candidate(rng, "child")
    child.host.type = HostType.NORMAL
    child.peer.state = PeerState.RUNNING
    return child, [candidate(rng, f"h{i}") for i in range(size)]


def ids(ranked: list[Candidate]) -> list[str]:
    return [c.peer.id for c in ranked]


class StrategyConformance:
    keeps_every_candidate: bool = True
    randomized: bool = False

    @pytest.fixture
    def strategy(self) -> Strategy:
        raise NotImplementedError("provide `strategy`: an instance of the plugin")

    def rank(self, strategy: Strategy, child: Candidate, candidates: list[Candidate], seed: int = 0) -> list[Candidate]:
        """``strategy.rank`` with Python's ``random`` seeded from ``seed`` (a randomized strategy's
        ranking depends on it; any other's must not)."""
        random.seed(seed)
        return strategy.rank(child, candidates, TASK)

    def check(self, ranked: list[Candidate], child: Candidate, candidates: list[Candidate]) -> None:
        """Only candidates it was handed, each once, not the child; all of them by default."""
        assert isinstance(ranked, list), f"rank returned a {type(ranked).__name__}, not a list"
        assert all(c is not child and c.peer.id != child.peer.id for c in ranked), "the child offered as its own parent"
        handed = {id(c) for c in candidates}
        assert all(isinstance(c, Candidate) and id(c) in handed for c in ranked), "a parent it was not handed"
        assert len({id(c) for c in ranked}) == len(ranked), "a parent offered twice"
        if self.keeps_every_candidate:
            assert sorted(ids(ranked)) == sorted(ids(candidates)), "a candidate left out"

    @pytest.mark.parametrize("seed", range(8))
    def test_a_ranking_holds_only_the_candidates_handed_each_once(self, strategy: Strategy, seed: int) -> None:
        child, candidates = swarm(seed, 2 + 4 * seed)
        self.check(self.rank(strategy, child, candidates), child, candidates)

    def test_no_candidate_ranks_to_no_parent(self, strategy: Strategy) -> None:
        child, _ = swarm(1, 0)
        assert self.rank(strategy, child, []) == []

    def test_one_candidate(self, strategy: Strategy) -> None:
        child, candidates = swarm(2, 1)
        ranked = self.rank(strategy, child, candidates)
        self.check(ranked, child, candidates)
        if self.keeps_every_candidate:
            assert ranked == candidates

    def test_a_thousand_candidates(self, strategy: Strategy) -> None:
        child, candidates = swarm(3, 1000)
        self.check(self.rank(strategy, child, candidates), child, candidates)

    @pytest.mark.parametrize("kind", ["seeds", "idle", "busy", "unreported", "far"])
    def test_a_swarm_of_one_kind_of_host(self, strategy: Strategy, kind: str) -> None:
        """Ties everywhere: hosts alike but for their ids still rank, without error."""
        child, candidates = swarm(4, 20)
        for c in candidates:
            h = c.host
            h.type = HostType.SUPER_SEED if kind == "seeds" else HostType.NORMAL
            h.max_tx_bandwidth = 0 if kind == "unreported" else GBIT
            h.tx_bandwidth = 2 * GBIT if kind == "busy" else 0
            h.upload_content_length = h.concurrent_upload_pieces = 0
            h.idc, h.location = ("elsewhere", "mars") if kind == "far" else (child.host.idc, child.host.location)
        self.check(self.rank(strategy, child, candidates), child, candidates)

    @pytest.mark.parametrize("seed", range(4))
    def test_the_same_swarm_ranks_the_same(self, strategy: Strategy, seed: int) -> None:
        """Called again, or on a copy of the swarm: the same order. Under another state of
        ``random`` too, unless the strategy says it is randomized."""
        child, candidates = swarm(10 + seed, 30)
        first = ids(self.rank(strategy, child, candidates, seed=1))
        assert ids(self.rank(strategy, child, candidates, seed=1)) == first
        twin_child, twins = copy.deepcopy((child, candidates))
        assert ids(self.rank(strategy, twin_child, twins, seed=1)) == first
        if not self.randomized:
            for other in (2, 3, 4):
                assert ids(self.rank(strategy, child, candidates, seed=other)) == first, (
                    "the ranking changed with Python's random state: set randomized = True if the strategy draws"
                )

    def test_it_changes_nothing_it_is_handed(self, strategy: Strategy) -> None:
        child, candidates = swarm(20, 40)
        handed = list(candidates)
        before: Any = copy.deepcopy((child, candidates, TASK))
        self.rank(strategy, child, candidates)
        assert [id(c) for c in candidates] == [id(c) for c in handed], "the candidates list was changed"
        assert (child, candidates, TASK) == before, "a peer, a host or the task was changed"

    def test_its_class_says_what_the_scheduler_reads(self, strategy: Strategy) -> None:
        """``name``, ``dag`` and ``parent_limit`` as the scheduler reads them; made from config
        as the scheduler makes it (``Config`` with no options)."""
        cls = type(strategy)
        assert isinstance(cls.name, str)
        assert cls.name
        assert isinstance(cls.dag, bool)
        assert isinstance(cls.parent_limit, int)
        assert cls.parent_limit >= 0
        made = cls(cls.parse_options({}, "scheduler.strategy"))
        child, candidates = swarm(5, 10)
        self.check(self.rank(made, child, candidates), child, candidates)
