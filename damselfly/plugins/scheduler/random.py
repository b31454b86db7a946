"""``random``: candidates in random order, the floor any strategy must beat."""

from __future__ import annotations

import random as _random
from typing import ClassVar

from damselfly.contracts import Candidate, Registry, Strategy
from damselfly.core.task import Task
from damselfly.hookspecs import hookimpl


class RandomStrategy(Strategy):
    name: ClassVar[str] = "random"

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        ranked = list(candidates)
        _random.shuffle(ranked)
        return ranked


@hookimpl
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    registry.add(RandomStrategy)
