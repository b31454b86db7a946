"""``disk`` storage: one sparse content file and one metadata file per task.

``DATA_DIR/tasks/<task id>/content`` holds the bytes at their offsets and
``meta.json`` the task and its verified pieces, each with its crc32 and its strong
digest. A piece is written in place, checked, and only then recorded, so a crash
leaves at worst a piece to fetch again, never a wrong one served. A stored piece is
never written again in place (the base storage verifies a second copy aside).

Durability: before each metadata save the task's content is ``fdatasync``ed, and
``meta.json`` is written to a temporary file, fsynced, renamed and its directory
fsynced, so what the metadata lists is on disk (``sync``; saves are batched, one a
``persist_interval``). A restart re-verifies what it is unsure of: every piece of a
task whose metadata was saved without a sync or whose content file has the wrong
size, and of every unfinished task after a crash (``tasks.open`` left behind); a
piece whose bytes no longer match its crc32 and strong digest is dropped.

While a download runs, and when it finishes, the metadata is saved from a worker
thread: on a busy ext4 a rename waits for the journal, 0.1-2 s under a swarm's
writes, and neither the event loop nor the download's end must wait with it (the
state is in memory at once; a crash before the save lands leaves a task to check
again, as a crash between periodic saves does). Saves are numbered, so a slow one
never overwrites a newer one, and a deleted task's late save is dropped; ``close``
writes whatever has not landed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import BufferedPieceWriter, FileRegion, Registry, Storage, piece_record, strong_of
from damselfly.core.errors import InvalidArgument, StorageError
from damselfly.core.piece import PieceSpan, algorithm_of, digest, strong_digest
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.hookspecs import hookimpl

META = "meta.json"
CONTENT = "content"
OPEN_MARK = "tasks.open"  # beside the root while a storage has it open: found at open, the last run crashed
# the storage is private to the daemon's user: a task may hold one of this node's files, and its signed URL
DIR_MODE = 0o700
FILE_MODE = 0o600


class DiskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    persist_interval: float = Field(1.0, ge=0, description="Seconds between metadata saves while downloading.")
    min_free_bytes: int = Field(0, ge=0, description="Refuse a task that would leave less free space than this.")
    preallocate: bool = Field(True, description="Reserve a task's blocks when it is created (posix_fallocate).")
    sync: bool = Field(
        True,
        description="fdatasync a task's content before each metadata save, and fsync the metadata, so that "
        "what it lists is on disk. Off (benchmarks only): a crash may leave listed pieces unwritten, and the "
        "next start re-reads and re-verifies the task.",
    )


def _task_to_json(task: Task, synced: bool) -> dict[str, Any]:
    return {
        "synced": synced,  # the content was fdatasynced before this was written
        "id": task.id,
        "url": task.url,
        "content_length": task.content_length,
        "piece_length": task.piece_length,
        "digest": task.digest,
        "tag": task.tag,
        "application": task.application,
        "filtered_query_params": task.filtered_query_params,
        "response_header": task.response_header,
        "state": task.state.value,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "expires_at": task.expires_at,
        "pieces": [p.to_dict() for p in sorted(task.pieces.values(), key=lambda p: p.number)],
    }


def _task_from_json(raw: dict[str, Any]) -> Task:
    task = Task(
        id=raw["id"],
        url=raw.get("url", ""),
        content_length=int(raw["content_length"]),
        piece_length=int(raw["piece_length"]),
        digest=raw.get("digest", ""),
        tag=raw.get("tag", ""),
        application=raw.get("application", ""),
        filtered_query_params=list(raw.get("filtered_query_params", [])),
        response_header=dict(raw.get("response_header", {})),
        state=TaskState(raw.get("state", "Running")),
        created_at=float(raw.get("created_at", 0)),
        updated_at=float(raw.get("updated_at", 0)),
        expires_at=float(raw.get("expires_at", 0)),
    )
    for p in raw.get("pieces", []):
        # "strong" (the piece's cryptographic digest) is absent from metadata written before it was kept
        number = int(p["number"])
        task.pieces[number] = piece_record(number, int(p["offset"]), int(p["length"]), p["digest"], p.get("strong", ""))
    return task


def _reverify(content: Path, task: Task) -> list[int]:
    """Re-read each listed piece of ``task``; drop (and return) those whose bytes no longer
    match their crc32 and strong digest (blocking: call it from a worker thread)."""
    dropped = []
    with open(content, "rb") as f:
        for number, record in sorted(task.pieces.items()):
            f.seek(record.offset)
            data = f.read(record.length)
            strong = strong_of(record)
            try:
                ok = digest(data) == record.digest
                ok = ok and (not strong or strong_digest(data, algorithm_of(strong)) == strong)
            except InvalidArgument:  # a digest this node cannot compute (blake3 gone): not known good
                ok = False
            if not ok or len(data) != record.length:
                dropped.append(number)
    for number in dropped:
        del task.pieces[number]
    return dropped


def _fsync(path: Path, *, data_only: bool = False) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


class _DiskWriter(BufferedPieceWriter):
    def __init__(self, storage: DiskStorage, task: Task, fd: int, span: PieceSpan):
        super().__init__(span)
        self._storage = storage
        self._task = task
        self._fd = fd

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        n = len(chunk)
        try:
            written = os.pwrite(self._fd, chunk, offset)
            while written < n:  # short writes happen on some filesystems
                written += os.pwrite(self._fd, memoryview(chunk)[written:], offset + written)
        except OSError as exc:
            raise StorageError(f"cannot write task {self._task.id[:12]}: {exc.strerror}") from None

    def _keep(self, record: PieceRecord) -> None:
        self._storage._piece_stored(self._task, record)


def _make_private(d: Path) -> None:
    """``d`` (a task's directory) and the files in it readable by the daemon's user only."""
    d.chmod(DIR_MODE)
    for f in d.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(FILE_MODE)


class DiskStorage(Storage):
    name: ClassVar[str] = "disk"
    Config = DiskConfig
    options: DiskConfig

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        super().__init__(data_dir, options)
        self.root = Path(data_dir) / "tasks"
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._meta_lock = threading.Lock()  # one metadata write at a time, loop or thread
        self._meta_seq = 0  # the number of the latest snapshot taken (on the loop)
        self._meta_taken: dict[str, int] = {}  # task id -> number of its latest snapshot
        self._meta_written: dict[str, int] = {}  # task id -> number of the snapshot on disk
        self._saves: set[asyncio.Task[None]] = set()  # saves started by finish, still running
        self._unsynced: set[str] = set()  # tasks whose metadata on disk was saved without a sync

    async def open(self) -> None:
        """Load the stored tasks. The storage is private to the daemon's user (the root and each
        task's directory 0700, its files 0600): a task's content may be a file of this node's, and
        its metadata holds the URL with its signature; a store made before is made private too."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            self.root.chmod(DIR_MODE)
            crashed = (self.root.parent / OPEN_MARK).exists()
            (self.root.parent / OPEN_MARK).write_text(str(os.getpid()))
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror}") from None
        for d in self.root.iterdir():
            if d.is_dir() and not (d / META).exists():  # a crash mid-create or mid-delete
                shutil.rmtree(d, ignore_errors=True)
        for meta in sorted(self.root.glob(f"*/{META}")):
            try:
                _make_private(meta.parent)
                raw = json.loads(meta.read_text())
                task = _task_from_json(raw)
                unsure = not raw.get("synced", False) or (crashed and task.state is not TaskState.SUCCEEDED)
                content = meta.parent / CONTENT
                if content.stat().st_size != task.content_length:  # cut short (or grown): re-read what is there
                    os.truncate(content, task.content_length)
                    unsure = True
                if unsure and task.pieces:
                    await self._reverify(task, content)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("dropping unreadable task in {}: {}", meta.parent, exc)
                shutil.rmtree(meta.parent, ignore_errors=True)
                continue
            self._tasks[task.id] = task
            if unsure:
                self._persist(task.id, sync=True)
        for stray in self.root.glob(f"*/{META}.tmp*"):
            stray.unlink(missing_ok=True)

    async def _reverify(self, task: Task, content: Path) -> None:
        """Check the pieces of a task the storage is unsure of, before any is served."""
        dropped = await asyncio.to_thread(_reverify, content, task)
        if dropped:
            logger.warning(
                "task {}: dropped {} pieces whose bytes did not reach the disk whole: {}",
                task.id[:12],
                len(dropped),
                dropped[:20],
            )
            if len(task.pieces) != task.piece_count:
                task.state = TaskState.RUNNING

    async def close(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            self._flusher = None
        unsaved = {t for t, seq in self._meta_taken.items() if self._meta_written.get(t, 0) < seq}
        for task_id in list(self._dirty | unsaved | self._unsynced):  # a save still in a thread may not land in time
            self._persist(task_id, sync=True)  # a clean close leaves nothing to re-verify
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        (self.root.parent / OPEN_MARK).unlink(missing_ok=True)

    def _dir(self, task_id: str) -> Path:
        if not task_id.isalnum():
            raise StorageError(f"bad task id {task_id!r}")
        return self.root / task_id

    def _fd(self, task_id: str) -> int:
        fd = self._fds.get(task_id)
        if fd is None:
            try:
                fd = os.open(self._dir(task_id) / CONTENT, os.O_RDWR)
            except OSError as exc:
                raise StorageError(f"cannot open task {task_id[:12]}: {exc.strerror}") from None
            self._fds[task_id] = fd
        return fd

    async def _create(self, task: Task) -> None:
        d = self._dir(task.id)
        free = shutil.disk_usage(self.root).free
        if free - task.content_length < self.options.min_free_bytes:
            raise StorageError(
                f"not enough disk space for task {task.id[:12]}: need {task.content_length} bytes, "
                f"{free} free in {self.root}"
            )
        try:
            d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            d.chmod(DIR_MODE)
            fd = os.open(d / CONTENT, os.O_RDWR | os.O_CREAT, FILE_MODE)
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, task.content_length)
            if task.content_length and self.options.preallocate:
                # Reserve the blocks now: a full disk fails here, with a clear error, not
                # mid-download; and writes into allocated blocks run about twice as fast.
                os.posix_fallocate(fd, 0, task.content_length)
            if self.options.sync:  # the task's directory is in the root for good (off the loop: a journal wait)
                await asyncio.to_thread(_fsync, self.root)
        except OSError as exc:
            shutil.rmtree(d, ignore_errors=True)
            raise StorageError(f"cannot create task {task.id[:12]} in {d}: {exc.strerror}") from None
        self._fds[task.id] = fd
        await self._save(task.id)

    def _writer(self, task: Task, span: PieceSpan) -> _DiskWriter:
        return _DiskWriter(self, task, self._fd(task.id), span)

    def _piece_stored(self, task: Task, record: PieceRecord) -> None:
        super()._piece_stored(task, record)
        self._dirty.add(task.id)
        if self.options.persist_interval == 0:
            self._persist(task.id)
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.options.persist_interval)
        for task_id in list(self._dirty):
            await self._save(task_id)

    def _snapshot(self, task_id: str, sync: bool | None = None) -> tuple[Path, str, int, bool] | None:
        self._dirty.discard(task_id)
        task = self._tasks.get(task_id)
        if task is None:
            return None
        self._meta_seq += 1
        self._meta_taken[task_id] = self._meta_seq
        sync = self.options.sync if sync is None else sync
        return self._dir(task_id), json.dumps(_task_to_json(task, sync)), self._meta_seq, sync

    def _write_meta(self, task_id: str, d: Path, text: str, seq: int, sync: bool) -> None:
        """With ``sync``: the content's bytes reach the disk first, then the metadata that lists them."""
        if sync:
            try:  # outside the lock: a delete need not wait for a long flush
                _fsync(d / CONTENT, data_only=True)
            except OSError as exc:
                if task_id in self._tasks:  # else deleted meanwhile
                    logger.error("cannot sync task {}: {}", task_id[:12], exc.strerror)
                return
        with self._meta_lock:
            if task_id not in self._tasks or self._meta_written.get(task_id, 0) >= seq:
                return  # the task was deleted, or a newer snapshot is on disk already
            tmp = d / f"{META}.tmp{os.getpid()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                with os.fdopen(fd, "w") as f:
                    os.fchmod(fd, FILE_MODE)
                    f.write(text)
                    if sync:
                        f.flush()
                        os.fsync(fd)
                os.replace(tmp, d / META)
                if sync:
                    _fsync(d)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                logger.error("cannot save metadata of task {}: {}", task_id[:12], exc.strerror)
                return
            self._meta_written[task_id] = seq
            if sync:
                self._unsynced.discard(task_id)
            else:
                self._unsynced.add(task_id)

    def _persist(self, task_id: str, sync: bool | None = None) -> None:
        """Save the metadata now, on the caller's thread (open, close, ``persist_interval`` 0)."""
        snap = self._snapshot(task_id, sync)
        if snap is not None:
            self._write_meta(task_id, *snap)

    async def _save(self, task_id: str) -> None:
        """Save the metadata from a worker thread; returns once it is on disk."""
        snap = self._snapshot(task_id)
        if snap is not None:
            await asyncio.to_thread(self._write_meta, task_id, *snap)

    def _forget_meta(self, task_id: str) -> None:
        with self._meta_lock:  # waits out a save in progress; a later one finds the task gone
            self._meta_written.pop(task_id, None)
            self._meta_taken.pop(task_id, None)
            self._unsynced.discard(task_id)

    async def _read(self, task: Task, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(os.pread, self._fd(task.id), length, offset)

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        _, record = self._present(task_id, number)
        return FileRegion(self._dir(task_id) / CONTENT, record.offset, record.length)

    async def _finished(self, task: Task) -> None:
        snap = self._snapshot(task.id)  # taken now: a ``close`` before the save runs writes it itself
        if snap is None:
            return
        save = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write_meta, task.id, *snap))
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)

    async def _delete(self, task_id: str) -> None:
        self._dirty.discard(task_id)
        fd = self._fds.pop(task_id, None)
        if fd is not None:
            os.close(fd)
        await asyncio.to_thread(self._forget_meta, task_id)
        await asyncio.to_thread(shutil.rmtree, self._dir(task_id), True)

    async def _export(self, task: Task, dest: Path) -> None:
        await asyncio.to_thread(shutil.copyfile, self._dir(task.id) / CONTENT, dest)


@hookimpl
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    registry.add(DiskStorage)
