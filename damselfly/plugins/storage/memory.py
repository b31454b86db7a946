"""``memory`` storage: tasks held in RAM, bounded in bytes, least recently used out.

Nothing survives a restart. A task that is still being written is never evicted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from damselfly.contracts import BufferedPieceWriter, Storage
from damselfly.core.errors import NotFound, StorageError
from damselfly.core.piece import PieceSpan
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.core.units import parse_size
from damselfly.hookspecs import hookimpl

if TYPE_CHECKING:
    from damselfly.plugin_manager import Registry


READ_CHUNK = 1 << 20


class MemoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    capacity: int = Field(1 << 30, gt=0, description="Bytes of content held at most (accepts `512MiB`).")

    @field_validator("capacity", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v


class _MemoryWriter(BufferedPieceWriter):
    def __init__(self, task: Task, buf: bytearray, span: PieceSpan):
        super().__init__(span)
        self._task, self._buf = task, buf

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        self._buf[offset : offset + len(chunk)] = chunk

    def _keep(self, record: PieceRecord) -> None:
        self._task.pieces[record.number] = record
        self._task.updated_at = time.time()


class MemoryStorage(Storage):
    name: ClassVar[str] = "memory"
    Config = MemoryConfig
    options: MemoryConfig

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        super().__init__(data_dir, options)
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._data: dict[str, bytearray] = {}

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    def get(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is not None:
            self._tasks.move_to_end(task_id)
        return task

    def _used(self) -> int:
        return sum(len(b) for b in self._data.values())

    async def create(self, task: Task) -> Task:
        existing = self._tasks.get(task.id)
        if existing is not None and existing.content_length == task.content_length:
            return existing
        if task.content_length > self.options.capacity:
            raise StorageError(
                f"task {task.id[:12]} ({task.content_length} bytes) is larger than the memory "
                f"storage's capacity ({self.options.capacity} bytes)"
            )
        while self._used() + task.content_length > self.options.capacity:
            victim = next((t for t in self._tasks.values() if t.state is TaskState.SUCCEEDED), None)
            if victim is None:
                raise StorageError("memory storage is full of tasks still downloading")
            await self.delete(victim.id)
        task.state = TaskState.RUNNING
        task.created_at = task.updated_at = time.time()
        self._tasks[task.id] = task
        self._data[task.id] = bytearray(task.content_length)
        return task

    def writer(self, task_id: str, span: PieceSpan) -> _MemoryWriter:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id[:12]} is not stored here")
        return _MemoryWriter(task, self._data[task_id], span)

    async def read_piece(self, task_id: str, number: int) -> bytes:
        task = self._tasks.get(task_id)
        if task is None or number not in task.pieces:
            raise NotFound(f"piece {number} of task {task_id[:12]} is not stored here")
        rec = task.pieces[number]
        return bytes(self._data[task_id][rec.offset : rec.offset + rec.length])

    async def read_range(self, task_id: str, offset: int, length: int) -> AsyncIterator[bytes]:
        if task_id not in self._data:
            raise NotFound(f"task {task_id[:12]} is not stored here")
        buf = self._data[task_id]
        end = min(offset + length, len(buf))
        while offset < end:
            n = min(READ_CHUNK, end - offset)
            yield bytes(buf[offset : offset + n])
            offset += n

    async def finish(self, task_id: str) -> None:
        task = self._tasks[task_id]
        if len(task.pieces) != task.piece_count:
            raise StorageError(f"task {task_id[:12]} has {len(task.pieces)} of {task.piece_count} pieces")
        task.state = TaskState.SUCCEEDED

    async def delete(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)
        self._data.pop(task_id, None)

    async def export(self, task_id: str, dest: Path) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED:
            raise NotFound(f"task {task_id[:12]} is not complete here")
        try:
            dest.write_bytes(self._data[task_id])
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror}") from None

    def usage(self) -> dict[str, int]:
        return {"tasks": len(self._tasks), "bytes": self._used(), "capacity": self.options.capacity}


@hookimpl
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    registry.add(MemoryStorage)
