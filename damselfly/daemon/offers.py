"""A super-seeding seed's offers: each task's ``SuperSeeder``, and the SyncPieces streams it wakes.

The bookkeeping is ``superseed.SuperSeeder`` (pure, the simulator drives it too); this
holds one per task on a seed with ``daemon.super_seed`` (none elsewhere), and one
wake-up event per child stream, so that an offer wakes the stream of the child told
of it, and no other.
"""

from __future__ import annotations

import asyncio
import time

from damselfly.core.task import Task
from damselfly.daemon.superseed import SuperSeeder


class Offers:
    """Each task's super-seeding state and its children's wake-ups; off unless ``enabled``."""

    def __init__(self, enabled: bool, *, offer_timeout: float, per_child: int):
        self.enabled = enabled  # a seed with daemon.super_seed
        self.offer_timeout = offer_timeout
        self.per_child = per_child
        self.seeders: dict[str, SuperSeeder] = {}
        self.events: dict[str, dict[object, asyncio.Event]] = {}  # task -> SyncPieces stream -> wake-up

    def seeder(self, task: Task) -> SuperSeeder | None:
        """The task's super-seeding state, when super-seeding is on (else None)."""
        if not self.enabled:
            return None
        seeder = self.seeders.get(task.id)
        if seeder is None:
            seeder = self.seeders[task.id] = SuperSeeder(
                task.piece_count, offer_timeout=self.offer_timeout, per_child=self.per_child
            )
        return seeder

    def offer(self, task: Task) -> None:
        """Offer what can be offered, and wake the streams of the children told."""
        seeder = self.seeder(task)
        if seeder is None:
            return
        events = self.events.get(task.id, {})
        told = seeder.sync(task.pieces.keys(), time.monotonic())
        if seeder.open(task.pieces.keys()):
            told = list(events)  # every piece went out once: every child may see every piece
        for child in told:
            event = events.get(child)
            if event is not None:
                event.set()

    def listen(self, task_id: str, child: object, event: asyncio.Event) -> None:
        """``child``'s stream is woken by ``event`` when it is offered a piece of ``task_id``."""
        self.events.setdefault(task_id, {})[child] = event

    def unlisten(self, task_id: str, child: object) -> None:
        self.events.get(task_id, {}).pop(child, None)

    def forget(self, task_id: str) -> None:
        """The task is gone: its state goes, and every stream waiting on it wakes (to end)."""
        self.seeders.pop(task_id, None)
        for event in self.events.pop(task_id, {}).values():
            event.set()
