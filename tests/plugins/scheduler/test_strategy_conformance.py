"""The strategy conformance kit run against the built-in strategies, and the kit catching
strategies that break the contract."""

import inspect
from typing import ClassVar

import pytest

from damselfly.contracts import Strategy
from damselfly.plugins.scheduler.dragonfly import DragonflyStrategy
from damselfly.plugins.scheduler.locality import LocalityStrategy
from damselfly.plugins.scheduler.random import RandomStrategy
from damselfly.plugins.scheduler.swarm import SwarmStrategy
from damselfly.testing.strategy import TASK, StrategyConformance, swarm


class TestDragonfly(StrategyConformance):
    @pytest.fixture
    def strategy(self):
        return DragonflyStrategy()


class TestLocality(StrategyConformance):
    @pytest.fixture
    def strategy(self):
        return LocalityStrategy()


class TestSwarm(StrategyConformance):
    @pytest.fixture
    def strategy(self):
        return SwarmStrategy()


class TestRandom(StrategyConformance):
    randomized = True

    @pytest.fixture
    def strategy(self):
        return RandomStrategy()


class OffersTheChild(Strategy):
    name: ClassVar[str] = "offers-the-child"

    def rank(self, child, candidates, task):
        return [child, *candidates]


class Remembers(Strategy):
    """Ranks the parents it saw before first: not a pure function of what it is handed."""

    name: ClassVar[str] = "remembers"

    def __init__(self, options=None):
        super().__init__(options)
        self.seen = []

    def rank(self, child, candidates, task):
        ranked = [*self.seen, *candidates]
        self.seen = candidates[:2]
        return ranked


class SortsInPlace(Strategy):
    name: ClassVar[str] = "sorts-in-place"

    def rank(self, child, candidates, task):
        candidates.sort(key=lambda c: c.peer.id)
        return candidates


class Undeclared(RandomStrategy):
    """Shuffles without saying it is randomized."""


@pytest.mark.parametrize(
    ("bad", "case", "says"),
    [
        (OffersTheChild, "test_a_ranking_holds_only_the_candidates_handed_each_once", "its own parent"),
        (Remembers, "test_one_candidate", "not handed"),
        (SortsInPlace, "test_it_changes_nothing_it_is_handed", "candidates list was changed"),
        (Undeclared, "test_the_same_swarm_ranks_the_same", "randomized = True"),
    ],
)
def test_the_kit_catches_a_strategy_that_breaks_the_contract(bad, case, says):
    strategy = bad()
    strategy.rank(*swarm(99, 3), TASK)  # an earlier decision, for the one that remembers
    run = getattr(StrategyConformance(), case)
    args = {"seed": 0} if "seed" in inspect.signature(run).parameters else {}
    with pytest.raises(AssertionError, match=says):
        run(strategy, **args)
