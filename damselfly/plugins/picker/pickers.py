"""Piece pickers: the order a download fetches its missing pieces in.

``sequential`` takes the lowest numbers first (upstream's order, and what a
reader streaming the output wants); ``rarest-first`` takes first the pieces the
fewest parents hold, ties broken at random, as BitTorrent does, so copies of
every piece spread through the swarm sooner. Its randomness is its own
``random.Random``, which a test may hand in (``rng``) to make the order reproducible.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel

from damselfly.contracts import PiecePicker
from damselfly.hookspecs import hookimpl

if TYPE_CHECKING:
    from damselfly.contracts import Registry


class SequentialPicker(PiecePicker):
    name: ClassVar[str] = "sequential"

    def order(self, missing: set[int], holders: dict[int, float]) -> list[int]:
        return sorted(missing)


class RarestFirstPicker(PiecePicker):
    name: ClassVar[str] = "rarest-first"

    def __init__(self, options: BaseModel | None = None, *, rng: random.Random | None = None):
        super().__init__(options)
        self.rng = rng or random.Random()

    def order(self, missing: set[int], holders: dict[int, float]) -> list[int]:
        ranked = list(missing)
        self.rng.shuffle(ranked)
        # pieces nobody holds yet cannot be fetched now: keep them last
        ranked.sort(key=lambda n: holders.get(n, 0) or 1 << 30)
        return ranked


@hookimpl
def damselfly_add_piece_pickers(registry: Registry[PiecePicker]) -> None:
    registry.add(SequentialPicker)
    registry.add(RarestFirstPicker)
