"""Super-seeding: a seed offers each new piece to one child, so its link carries each piece once.

A seed's link is the one way new bytes enter the swarm. A seed that shows every
child every piece sends the early pieces several times over while later ones
wait, and its link becomes the bottleneck. With ``daemon.super_seed`` the seed
tells one child at a time of each piece it gets from the source (its SyncPieces
stream to that child alone carries it): the child fetches it, and the others get
it from that child or from the peers it reached. Nobody is refused anything: a
child asks only for what it was told of.

Each offer goes to the child with the fewest seed pieces outstanding (offered and
not yet taken, or being sent), the least offered so far among equals, and a child
holds at most ``per_child`` of them, so the seed's upload spreads over children
whose downloads are free. An offer not taken within ``offer_timeout`` seconds is
made to one more child too, and so is one whose child went away. Once the seed
holds every piece and each has gone out at least once, every child sees
everything: the seed still serves a piece whose only copy left with a peer that
vanished, and its upload helps the last pieces along.

This is bookkeeping only: the caller passes the time in, and the SyncPieces streams
and the piece server (``damselfly.daemon.upload``) act on it. The simulator
(``benchmarks/simulate.py``) drives the same class.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field


@dataclass
class _Child:
    wants: set[int]  # pieces it asked to hear of (what it was missing when its stream began)
    order: int  # when it joined: the last tie-break
    offered: dict[int, float] = field(default_factory=dict)  # piece -> when offered; until its send ends
    total: int = 0  # offers it has had


class SuperSeeder:
    def __init__(self, piece_count: int, *, offer_timeout: float = 2.0, per_child: int = 1):
        self.piece_count = piece_count
        self.offer_timeout = offer_timeout
        self.per_child = per_child
        self.children: dict[Hashable, _Child] = {}
        self.sent: set[int] = set()  # pieces whose send to some child began
        self._sending: dict[int, Hashable | None] = {}  # piece being sent -> the child it was offered to
        self._joins = itertools.count()

    # -- children ------------------------------------------------------------------------

    def join(self, child: Hashable, wants: Collection[int]) -> None:
        """A child's SyncPieces stream began, asking to hear of ``wants`` (empty: every piece)."""
        self.children[child] = _Child(set(wants) or set(range(self.piece_count)), next(self._joins))

    def leave(self, child: Hashable) -> None:
        """Its stream ended; what it was offered and did not take is offered again by ``sync``."""
        self.children.pop(child, None)

    # -- pieces --------------------------------------------------------------------------

    def sync(self, held: Collection[int], now: float) -> list[Hashable]:
        """Offer what can be offered of the pieces ``held``; the children told of something new.

        A piece is offered when nobody took it yet and no live child holds an offer of
        it, or when its offers are all older than ``offer_timeout`` (then to one more).
        """
        if self.open(held):
            return []
        told: list[Hashable] = []
        offered_at: dict[int, float] = {}
        for c in self.children.values():
            for n, t in c.offered.items():
                offered_at[n] = max(t, offered_at.get(n, t))
        room = sum(max(0, self.per_child - len(c.offered)) for c in self.children.values())
        for number in sorted(set(held) - self.sent) if room else ():
            if number in offered_at and now - offered_at[number] < self.offer_timeout:
                continue
            child = self._offer(number, now)
            if child is not None:
                told.append(child)
                room -= 1
                if not room:
                    break
        return told

    def taken(self, number: int) -> None:
        """The seed began sending piece ``number``: the offer is settled (its load stays until ``done``)."""
        self.sent.add(number)
        owners = [(c.offered[number], k) for k, c in self.children.items() if number in c.offered]
        owners.sort(key=lambda o: o[0])
        for _, k in owners[1:]:
            del self.children[k].offered[number]
        self._sending[number] = owners[0][1] if owners else None

    def done(self, number: int) -> None:
        """The send of piece ``number`` ended."""
        child = self._sending.pop(number, None)
        c = self.children.get(child) if child is not None else None
        if c is not None:
            c.offered.pop(number, None)

    def next_deadline(self) -> float | None:
        """When an offer not yet taken times out (None: none is waiting)."""
        waiting = [t for c in self.children.values() for n, t in c.offered.items() if n not in self.sent]
        return min(waiting) + self.offer_timeout if waiting else None

    def open(self, held: Collection[int]) -> bool:
        """Whether every child may see every piece: the seed holds them all and each went out once."""
        return len(held) >= self.piece_count and len(self.sent) >= self.piece_count

    def visible(self, child: Hashable, held: Collection[int]) -> set[int]:
        """The pieces of ``held`` that ``child`` may hear of now."""
        if self.open(held):
            return set(held)
        c = self.children.get(child)
        if c is None:
            return set()
        return {n for n in c.offered if n in held}

    # -- inside --------------------------------------------------------------------------

    def _offer(self, number: int, now: float) -> Hashable | None:
        candidates = [
            (k, c)
            for k, c in self.children.items()
            if number in c.wants and number not in c.offered and len(c.offered) < self.per_child
        ]
        if not candidates:
            return None
        # the fewest seed pieces outstanding, then the fewest offers so far (round-robin among equals)
        child, c = min(candidates, key=lambda kc: (len(kc[1].offered), kc[1].total, kc[1].order))
        c.offered[number] = now
        c.total += 1
        return child
