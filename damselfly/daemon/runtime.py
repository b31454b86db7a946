"""What a daemon knows of a task while it is alive: who waits on which piece.

Storage holds the bytes and the verified pieces; a ``TaskRuntime`` adds the
events that the upload side (``SyncPieces``) and local clients wait on, so a
piece is servable the moment it is stored. Each download also keeps a bounded piece
timeline (what was asked of whom, how it ended, reschedules, stalls, back-to-source and
why) that outlives it, for ``damselfly tasks show``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from damselfly.core.piece import ByteRange
from damselfly.core.task import PieceRecord


@dataclass(frozen=True, slots=True)
class PieceEvent:
    record: PieceRecord
    traffic_type: int  # vortex.TrafficType
    parent_id: str
    cost: float


TIMELINE_EVENTS = 4096  # events kept per download: the latest, where a long one has more
TIMELINE_TASKS = 256  # finished downloads whose timelines are kept, the latest


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One step of a download, for diagnosis: ``kind`` is requested, stored, failed, stalled
    (a piece), or reschedule, stall, back_to_source (the download); ``piece`` is -1 for the latter."""

    at: float  # wall-clock seconds
    kind: str
    piece: int = -1
    parent_id: str = ""
    detail: str = ""
    length: int = 0  # bytes stored
    seconds: float = 0.0  # how long the piece took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """One running download of a task: its progress, for whoever follows it."""

    task_id: str
    range: ByteRange | None = None
    history: list[Progress] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    runner: asyncio.Task[None] | None = None
    peer_id: str = ""
    board: TaskBoard | None = None
    # host id -> the pieces that host's peer told this download it holds (its SyncPieces
    # stream as our parent): the pieces this daemon need not announce to that host in turn
    held: dict[str, set[int]] = field(default_factory=dict)
    timeline: deque[TimelineEvent] = field(default_factory=lambda: deque(maxlen=TIMELINE_EVENTS))

    def note(
        self, kind: str, piece: int = -1, parent_id: str = "", detail: str = "", length: int = 0, seconds: float = 0.0
    ) -> None:
        """Add a step to this download's timeline."""
        self.timeline.append(TimelineEvent(time.time(), kind, piece, parent_id, detail, length, seconds))

    def publish(self, event: Progress) -> None:
        self.history.append(event)
        if isinstance(event, Finished | Failed):
            self.done = True
        self.changed.set()
        self.changed = asyncio.Event()
        if self.board is not None:
            self.board.poke(self.task_id)

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


class TaskBoard:
    """The downloads running in a daemon, by task, and one signal per task that fires
    whenever any of them stores a piece (what ``SyncPieces`` waits on)."""

    def __init__(self) -> None:
        self._running: dict[str, list[TaskRuntime]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._peer_ids: dict[str, str] = {}
        self._timelines: dict[str, list[TimelineEvent]] = {}  # the last finished download's, per task

    def running(self, task_id: str) -> list[TaskRuntime]:
        return [rt for rt in self._running.get(task_id, ()) if not rt.done]

    def all_running(self) -> list[TaskRuntime]:
        return [rt for rts in self._running.values() for rt in rts if not rt.done]

    def add(self, rt: TaskRuntime) -> None:
        rt.board = self
        self._running.setdefault(rt.task_id, []).append(rt)

    def remove(self, rt: TaskRuntime) -> None:
        if rt.peer_id:
            self._peer_ids[rt.task_id] = rt.peer_id
        if rt.timeline:
            self._timelines.pop(rt.task_id, None)  # the latest last, the oldest dropped first
            self._timelines[rt.task_id] = list(rt.timeline)
            while len(self._timelines) > TIMELINE_TASKS:
                del self._timelines[next(iter(self._timelines))]
        rts = self._running.get(rt.task_id, [])
        if rt in rts:
            rts.remove(rt)
        if not rts:
            self._running.pop(rt.task_id, None)
        self.poke(rt.task_id)

    def event(self, task_id: str) -> asyncio.Event:
        return self._events.setdefault(task_id, asyncio.Event())

    def poke(self, task_id: str) -> None:
        event = self._events.pop(task_id, None)
        if event is not None:
            event.set()

    def held_by(self, task_id: str, host_id: str) -> set[int]:
        """The pieces of ``task_id`` that ``host_id`` is known to hold, from our downloads' parents."""
        found: set[int] = set()
        for rt in self._running.get(task_id, ()):
            found |= rt.held.get(host_id, set())
        return found

    def peer_id(self, task_id: str) -> str:
        """The peer id this daemon holds the task under (the latest download's)."""
        for rt in reversed(self._running.get(task_id, [])):
            if rt.peer_id:
                return rt.peer_id
        return self._peer_ids.get(task_id, "")

    def timeline(self, task_id: str) -> list[TimelineEvent] | None:
        """The piece timeline of ``task_id``'s running download, else of its last one; None if none is kept."""
        running = self._running.get(task_id)
        if running:
            return list(running[-1].timeline)
        return self._timelines.get(task_id)

    def forget(self, task_id: str) -> list[TaskRuntime]:
        self._peer_ids.pop(task_id, None)
        return self._running.pop(task_id, [])
