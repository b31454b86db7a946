"""What a daemon knows of a task while it is alive: who waits on which piece.

Storage holds the bytes and the verified pieces; a ``TaskRuntime`` adds the
events that the upload side (``SyncPieces``) and local clients wait on, so a
piece is servable the moment it is stored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from damselfly.core.task import PieceRecord


@dataclass(frozen=True, slots=True)
class PieceEvent:
    record: PieceRecord
    traffic_type: int  # vortex.TrafficType
    parent_id: str
    cost: float


@dataclass(frozen=True, slots=True)
class Started:
    content_length: int
    piece_length: int
    response_header: dict[str, str]


@dataclass(frozen=True, slots=True)
class Finished:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


Progress = Started | PieceEvent | Finished | Failed


@dataclass
class TaskRuntime:
    task_id: str
    history: list[Progress] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    runner: asyncio.Task[None] | None = None
    peer_id: str = ""

    def publish(self, event: Progress) -> None:
        self.history.append(event)
        if isinstance(event, Finished | Failed):
            self.done = True
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self) -> asyncio.AsyncIterator[Progress]:  # type: ignore[name-defined]
        """Every event so far, then each new one, until Finished or Failed."""
        i = 0
        while True:
            while i < len(self.history):
                event = self.history[i]
                i += 1
                yield event
                if isinstance(event, Finished | Failed):
                    return
            await self.changed.wait()
