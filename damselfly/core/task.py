"""A task: one piece of content, named by its task id, laid out in pieces."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, MutableSet
from dataclasses import dataclass, field
from typing import Any

from damselfly.core.piece import Layout


class TaskState(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


@dataclass(slots=True)
class PieceRecord:
    """A piece that is known: where it lies and its ``crc32:`` digest."""

    number: int
    offset: int
    length: int
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "offset": self.offset, "length": self.length, "digest": self.digest}


class IndexedSet(MutableSet[str]):
    """A set of ids that also has an order, for O(1) access by position: a scheduler picks
    candidates from a random point in a task's thousands of peers without copying them."""

    __slots__ = ("_items", "_pos")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._items: list[str] = []
        self._pos: dict[str, int] = {}
        for x in items:
            self.add(x)

    def __contains__(self, x: object) -> bool:
        return x in self._pos

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"IndexedSet({self._items!r})"

    def add(self, x: str) -> None:
        if x not in self._pos:
            self._pos[x] = len(self._items)
            self._items.append(x)

    def discard(self, x: str) -> None:
        i = self._pos.pop(x, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):  # the last one fills the hole
            self._items[i] = last
            self._pos[last] = i

    @property
    def items(self) -> list[str]:
        """The ids in their current order (the list itself: do not change it)."""
        return self._items


@dataclass(slots=True)
class Task:
    """What both the scheduler and a daemon's storage know of a task."""

    id: str
    url: str = ""
    content_length: int = -1  # -1 until someone has stat'ed the source
    piece_length: int = 0
    digest: str = ""  # whole-content digest, when the user gave one
    tag: str = ""
    application: str = ""
    filtered_query_params: list[str] = field(default_factory=list)
    request_header: dict[str, str] = field(default_factory=dict)
    response_header: dict[str, str] = field(default_factory=dict)
    state: TaskState = TaskState.PENDING
    pieces: dict[int, PieceRecord] = field(default_factory=dict)
    peer_ids: IndexedSet = field(default_factory=IndexedSet)
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float = 0.0  # a persistent cache task's end of life (0: an ordinary task)

    @property
    def known_length(self) -> bool:
        return self.content_length >= 0 and self.piece_length > 0

    @property
    def layout(self) -> Layout:
        return Layout(self.content_length, self.piece_length)

    @property
    def piece_count(self) -> int:
        # Layout(...).piece_count, without building a Layout (answers read it often)
        n, size = self.content_length, self.piece_length
        return -(-n // size) if n >= 0 and size > 0 else 0
