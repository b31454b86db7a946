"""``memory`` storage: tasks held in RAM, bounded in bytes, least recently used out.

Nothing survives a restart. A task that is still being written is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from damselfly.contracts import BufferedPieceWriter, Registry, Storage
from damselfly.core.errors import StorageError
from damselfly.core.piece import PieceSpan
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.core.units import parse_size
from damselfly.hookspecs import hookimpl


class MemoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    capacity: int = Field(1 << 30, gt=0, description="Bytes of content held at most (accepts `512MiB`).")

    @field_validator("capacity", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v


class _MemoryWriter(BufferedPieceWriter):
    def __init__(self, storage: MemoryStorage, task: Task, buf: bytearray, span: PieceSpan):
        super().__init__(span)
        self._storage, self._task, self._buf = storage, task, buf

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        self._buf[offset : offset + len(chunk)] = chunk

    def _keep(self, record: PieceRecord) -> None:
        self._storage._piece_stored(self._task, record)


class MemoryStorage(Storage):
    name: ClassVar[str] = "memory"
    Config = MemoryConfig
    options: MemoryConfig
    _tasks: OrderedDict[str, Task]  # least recently used first

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        super().__init__(data_dir, options)
        self._tasks = OrderedDict()
        self._data: dict[str, bytearray] = {}

    def get(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is not None:
            self._tasks.move_to_end(task_id)
        return task

    def _used(self) -> int:
        return sum(len(b) for b in self._data.values())

    async def _create(self, task: Task) -> None:
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
        self._data[task.id] = bytearray(task.content_length)

    def _writer(self, task: Task, span: PieceSpan) -> _MemoryWriter:
        return _MemoryWriter(self, task, self._data[task.id], span)

    async def _read(self, task: Task, offset: int, length: int) -> bytes:
        return bytes(self._data[task.id][offset : offset + length])

    async def _delete(self, task_id: str) -> None:
        self._data.pop(task_id, None)

    async def _export(self, task: Task, dest: Path) -> None:
        dest.write_bytes(self._data[task.id])

    def usage(self) -> dict[str, int]:
        return {"tasks": len(self._tasks), "bytes": self._used(), "capacity": self.options.capacity}


@hookimpl
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    registry.add(MemoryStorage)
