"""``sqlite`` storage: pieces as rows of one SQLite database (an example third-party plugin)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from damselfly import hookimpl
from damselfly.contracts import BufferedPieceWriter, Storage
from damselfly.core.errors import NotFound, StorageError
from damselfly.core.piece import PieceSpan
from damselfly.core.task import PieceRecord, Task, TaskState

if TYPE_CHECKING:
    from damselfly.plugin_manager import Registry


SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pieces (
    task_id TEXT NOT NULL, number INTEGER NOT NULL, offset INTEGER NOT NULL, digest TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (task_id, number)
);
"""


class SqliteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _meta(task: Task) -> str:
    keys = ("url", "content_length", "piece_length", "tag", "application", "created_at", "updated_at", "expires_at")
    return json.dumps({**{k: getattr(task, k) for k in keys}, "state": task.state.value})


class _Writer(BufferedPieceWriter):
    def __init__(self, storage: SqliteStorage, task: Task, span: PieceSpan):
        super().__init__(span)
        self._storage, self._task = storage, task
        self._buf = bytearray(span.length)

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        start = offset - self.span.offset
        self._buf[start : start + len(chunk)] = chunk

    def _keep(self, record: PieceRecord) -> None:
        self._storage._store(self._task, record, bytes(self._buf))


class SqliteStorage(Storage):
    name: ClassVar[str] = "sqlite"
    Config = SqliteConfig

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        super().__init__(data_dir, options)
        self._tasks: dict[str, Task] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # writers commit from transport threads

    async def open(self) -> None:
        try:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(Path(self.data_dir) / "pieces.sqlite", check_same_thread=False)
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the sqlite storage in {self.data_dir}: {exc}") from None
        for task_id, meta in self._db.execute("SELECT id, meta FROM tasks").fetchall():
            raw = json.loads(meta)
            task = Task(id=task_id, **{k: v for k, v in raw.items() if k != "state"}, state=TaskState(raw["state"]))
            for number, offset, digest, length in self._db.execute(
                "SELECT number, offset, digest, length(data) FROM pieces WHERE task_id = ?", (task_id,)
            ):
                task.pieces[number] = PieceRecord(number, offset, length, digest)
            self._tasks[task_id] = task

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _sql(self, sql: str, args: tuple[object, ...]) -> None:
        assert self._db is not None
        with self._lock:
            try:
                with self._db:
                    self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite storage: {exc}") from None

    def _store(self, task: Task, record: PieceRecord, data: bytes) -> None:
        self._sql(
            "INSERT OR REPLACE INTO pieces VALUES (?, ?, ?, ?, ?)",
            (task.id, record.number, record.offset, record.digest, data),
        )
        task.pieces[record.number] = record
        task.updated_at = time.time()

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def create(self, task: Task) -> Task:
        if task.id in self._tasks:
            return self._tasks[task.id]
        task.created_at = task.updated_at = time.time()
        task.state = TaskState.RUNNING
        self._sql("INSERT OR REPLACE INTO tasks VALUES (?, ?)", (task.id, _meta(task)))
        self._tasks[task.id] = task
        return task

    def writer(self, task_id: str, span: PieceSpan) -> _Writer:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        return _Writer(self, task, span)

    async def read_piece(self, task_id: str, number: int) -> bytes:
        task = self._tasks.get(task_id)
        if task is None or number not in task.pieces:
            raise NotFound(f"piece {number} of task {task_id} not found")
        assert self._db is not None
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM pieces WHERE task_id = ? AND number = ?", (task_id, number)
            ).fetchone()
        if row is None:
            raise NotFound(f"piece {number} of task {task_id} not found")
        return bytes(row[0])

    async def read_range(self, task_id: str, offset: int, length: int) -> AsyncIterator[bytes]:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        end = offset + length
        for number in task.layout.numbers_for_range(offset, length):
            data = await self.read_piece(task_id, number)
            start = task.layout.span(number).offset
            yield data[max(offset - start, 0) : min(end - start, len(data))]

    async def finish(self, task_id: str) -> None:
        task = self._tasks[task_id]
        if len(task.pieces) != task.piece_count:
            raise StorageError(f"task {task_id[:12]} has {len(task.pieces)} of {task.piece_count} pieces")
        task.state = TaskState.SUCCEEDED
        self._sql("UPDATE tasks SET meta = ? WHERE id = ?", (_meta(task), task_id))

    async def delete(self, task_id: str) -> None:
        if self._tasks.pop(task_id, None) is not None:
            self._sql("DELETE FROM pieces WHERE task_id = ?", (task_id,))
            self._sql("DELETE FROM tasks WHERE id = ?", (task_id,))

    async def export(self, task_id: str, dest: Path) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED:
            raise NotFound(f"task {task_id} is not complete here")
        try:
            with open(dest, "wb") as f:
                async for chunk in self.read_range(task_id, 0, task.content_length):
                    await asyncio.to_thread(f.write, chunk)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror}") from None

    def usage(self) -> dict[str, int]:
        stored = sum(p.length for t in self._tasks.values() for p in t.pieces.values())
        return {"tasks": len(self._tasks), "bytes": stored}


@hookimpl
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    registry.add(SqliteStorage)
