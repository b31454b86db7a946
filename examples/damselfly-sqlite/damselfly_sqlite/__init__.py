"""``sqlite`` storage: pieces as rows of one SQLite database (an example third-party plugin)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from damselfly import hookimpl
from damselfly.contracts import BufferedPieceWriter, Registry, Storage
from damselfly.core.errors import NotFound, StorageError
from damselfly.core.piece import PieceSpan
from damselfly.core.task import PieceRecord, Task, TaskState

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
    """Only what is its own: the base storage finds tasks and pieces, checks them, clips
    ranges (cut from whole pieces, as this storage reads them) and exports."""

    name: ClassVar[str] = "sqlite"
    Config = SqliteConfig

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        super().__init__(data_dir, options)
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
        self._piece_stored(task, record)

    async def _create(self, task: Task) -> None:
        self._sql("INSERT OR REPLACE INTO tasks VALUES (?, ?)", (task.id, _meta(task)))

    def _writer(self, task: Task, span: PieceSpan) -> _Writer:
        return _Writer(self, task, span)

    async def _read_piece(self, task: Task, record: PieceRecord) -> bytes:
        assert self._db is not None
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM pieces WHERE task_id = ? AND number = ?", (task.id, record.number)
            ).fetchone()
        if row is None:
            raise NotFound(f"piece {record.number} of task {task.id[:12]} is not stored here")
        return bytes(row[0])

    async def _finished(self, task: Task) -> None:
        self._sql("UPDATE tasks SET meta = ? WHERE id = ?", (_meta(task), task.id))

    async def _delete(self, task_id: str) -> None:
        self._sql("DELETE FROM pieces WHERE task_id = ?", (task_id,))
        self._sql("DELETE FROM tasks WHERE id = ?", (task_id,))


@hookimpl
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    registry.add(SqliteStorage)
