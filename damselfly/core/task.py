"""A task: one piece of content, named by its task id, laid out in pieces."""

from __future__ import annotations

import enum
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
    peer_ids: set[str] = field(default_factory=set)
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
        return self.layout.piece_count if self.known_length else 0
