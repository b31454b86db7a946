"""The plugin contracts: sources, transports, storages, scheduling strategies, piece pickers.

Each plugin is a class with ``name: ClassVar[str]`` and an optional pydantic
``Config`` model for its options; a registry hook adds the class to a ``Registry``,
and the daemon or scheduler instantiates it from config.
"""

from __future__ import annotations

import abc
import asyncio
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from damselfly.core.errors import InvalidArgument, NotFound, PieceCorrupt, StorageError
from damselfly.core.host import Host
from damselfly.core.peer import Peer
from damselfly.core.piece import DIGEST_ALGORITHM, Hasher, PieceSpan, algorithm_of, crc32, format_digest, new_hasher
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.core.vortex import PieceMetadata


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """What every plugin class has in common."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoOptions

    @classmethod
    def available(cls) -> str | None:
        """None when the plugin can run here, else the reason it cannot."""
        return None

    @classmethod
    def parse_options(cls, options: dict[str, Any], where: str) -> BaseModel:
        try:
            return cls.Config(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise InvalidArgument(f"invalid config: {where}.{loc}: {err['msg']}") from None


P = TypeVar("P", bound=Plugin)


class Registry(Generic[P]):
    """Name -> plugin class for one kind; a duplicate name is an error.

    Registry hooks receive one and ``add`` classes to it. ``base`` is the kind's (abstract)
    contract, which every added class must subclass; the type parameter is the same class,
    spelled ``Registry[Source]("source", Source)``.
    """

    def __init__(self, kind: str, base: type[Plugin]):
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[P]] = {}

    def add(self, cls: type[P]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} has no `name`")
        if name in self._classes:
            other = self._classes[name]
            raise InvalidArgument(
                f"two {self.kind} plugins are named {name!r}: "
                f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
            )
        self._classes[name] = cls

    def remove(self, name: str) -> None:
        self._classes.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type[P]:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise InvalidArgument(f"no {self.kind} plugin named {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[type[P]]:
        return [self._classes[n] for n in self.names()]


# -- sources --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceInfo:
    content_length: int  # -1 when the origin does not say
    supports_range: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SourceEntry:
    url: str
    content_length: int
    is_dir: bool = False


class Source(Plugin, abc.ABC):
    """Reads content from an origin. Errors are ``BackendError`` when the origin's."""

    schemes: ClassVar[tuple[str, ...]]
    # the field of Dragonfly's ``Download`` whose values a request may set options from:
    # "object_storage", "hdfs" or "hugging_face" (their keys named as in the proto)
    request_field: ClassVar[str] = ""
    # option names that are credentials (None: guessed from the names) and that name an endpoint:
    # a request from the network, or one that overrides an endpoint, never gets the configured credentials
    credential_fields: ClassVar[frozenset[str] | None] = None
    endpoint_fields: ClassVar[frozenset[str]] = frozenset()
    # the back-to-source policy (damselfly.security.policy.SourcePolicy), set by make_source
    policy: Any = None

    def __init__(self, options: BaseModel | None = None):
        self.options = options or self.Config()

    @classmethod
    def handles(cls, scheme: str) -> bool:
        """A fallback for schemes no plugin names in ``schemes`` (the fsspec adapter)."""
        return False

    @classmethod
    def request_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Options from a request's ``request_field`` values; by default the keys ``Config`` has."""
        fields = getattr(cls.Config, "model_fields", {})
        return {k: v for k, v in values.items() if k in fields and v not in ("", None)}

    @abc.abstractmethod
    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo: ...

    @abc.abstractmethod
    def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """Yield the bytes [offset, offset + length) in chunks."""

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        raise InvalidArgument(f"source {self.name!r} cannot list {url!r}")

    async def close(self) -> None:
        return None


# -- storages ---------------------------------------------------------------------


class PieceWriter(Protocol):
    """Receives one piece's bytes; nothing is servable until ``commit``."""

    def write(self, chunk: bytes | memoryview) -> None:
        """Take the next bytes of the piece; may be called from a worker thread."""
        ...

    async def commit(self, expected_digest: str | None, *, strong: str = "") -> PieceRecord:
        """Check the length and the crc32 (against ``expected_digest`` when given), then
        mark the piece present, keeping ``strong`` (the piece's cryptographic digest, which
        the caller computed and checked) with it; raises PieceCorrupt and keeps nothing otherwise."""
        ...

    def abort(self) -> None: ...


@dataclass(slots=True)
class DigestedPiece(PieceRecord):
    """A stored piece with both its digests: ``digest``, the crc32 that Vortex frame headers
    carry, and ``strong`` (``sha256:<hex>`` or ``blake3:<hex>``), which the source reader
    computed and which every child checked before storing the piece."""

    strong: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**PieceRecord.to_dict(self), "strong": self.strong}


def strong_of(record: PieceRecord) -> str:
    """A stored piece's strong digest; "" for a piece stored before damselfly kept one."""
    return getattr(record, "strong", "")


def piece_record(number: int, offset: int, length: int, digest: str, strong: str = "") -> PieceRecord:
    """A piece record as storages keep it: with its strong digest where there is one."""
    if strong:
        return DigestedPiece(number, offset, length, digest, strong)
    return PieceRecord(number, offset, length, digest)


# Bytes a storage's ``read_range`` reads at a time, where it reads by byte.
READ_CHUNK = 1 << 20

# Seconds: a storage write on the event loop slower than this sends the rest of that
# piece's (or read's) writes to a worker thread; page-cache writes take microseconds.
INLINE_WRITE_LIMIT = 0.002


class BufferedPieceWriter(abc.ABC):
    """The common half of a storage's writer: length checks, crc32 and abort.

    ``write`` may be called from a transport's worker thread; after ``abort``
    returns no further byte reaches the storage. Subclasses put bytes with
    ``_put`` and record a verified piece with ``_keep``.
    """

    def __init__(self, span: PieceSpan):
        self.span = span
        self._pos = span.offset
        self._crc = 0
        self._lock = threading.Lock()
        self._closed = False

    @abc.abstractmethod
    def _put(self, chunk: bytes | memoryview, offset: int) -> None: ...

    @abc.abstractmethod
    def _keep(self, record: PieceRecord) -> None: ...

    def write(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        with self._lock:
            if self._closed:
                raise PieceCorrupt(f"piece {self.span.number}: write after abort")
            if self._pos + n > self.span.end:
                raise PieceCorrupt(f"piece {self.span.number} is longer than its {self.span.length} bytes")
            self._put(chunk, self._pos)
            self._crc = crc32(chunk, self._crc)
            self._pos += n

    async def commit(self, expected_digest: str | None, *, strong: str = "") -> PieceRecord:
        with self._lock:
            self._closed = True
            got = self._pos - self.span.offset
            if got != self.span.length:
                raise PieceCorrupt(f"piece {self.span.number} has {got} of {self.span.length} bytes")
            digest = f"{DIGEST_ALGORITHM}:{self._crc}"
            if expected_digest is not None and digest != expected_digest:
                raise PieceCorrupt(f"piece {self.span.number}: expected {expected_digest}, got {digest}")
        record = piece_record(self.span.number, self.span.offset, self.span.length, digest, strong)
        self._keep(record)
        return record

    def abort(self) -> None:
        with self._lock:
            self._closed = True


class DigestingWriter:
    """A ``PieceWriter`` around another that also computes the piece's strong digest as the
    bytes pass, in the same pass (and the same thread) as the storage's write and crc32, and
    checks it before anything is committed.

    ``commit(expected_digest, expected_strong=...)``: a piece whose strong digest is not
    ``expected_strong`` is aborted (PieceCorrupt), whatever its crc32 says; a piece that
    passes is committed with its strong digest, which the storage keeps.
    """

    def __init__(self, inner: PieceWriter, algorithm: str, number: int, also: list[Hasher] | None = None):
        self.inner = inner
        self.algorithm = algorithm
        self.number = number
        self._hash: Hasher = new_hasher(algorithm)
        self.also = also or []  # more running hashes the bytes go into (a whole content's, in order)

    def write(self, chunk: bytes | memoryview) -> None:
        self.inner.write(chunk)  # refused after abort: nothing reaches the hash either
        self._hash.update(chunk)
        for h in self.also:
            h.update(chunk)

    def digest(self) -> str:
        """The strong digest of the bytes written so far."""
        return format_digest(self.algorithm, self._hash)

    async def commit(
        self, expected_digest: str | None, *, strong: str = "", expected_strong: str | None = None
    ) -> PieceRecord:
        got = self.digest()
        if expected_strong is not None:
            if algorithm_of(expected_strong) != self.algorithm:
                self.inner.abort()
                raise PieceCorrupt(
                    f"piece {self.number}: expected a {algorithm_of(expected_strong)} digest, hashed {got}"
                )
            if got != expected_strong:
                self.inner.abort()
                raise PieceCorrupt(f"piece {self.number}: expected {expected_strong}, got {got}")
        return await self.inner.commit(expected_digest, strong=strong or got)

    def abort(self) -> None:
        self.inner.abort()


class StagedPieceWriter(BufferedPieceWriter):
    """A second fetch of a piece (endgame): verified like any other, kept aside until it wins.

    Its bytes go to a temporary file (in memory while small), never into the task, so a
    losing copy can be dropped at any moment, even with a worker thread still writing,
    and a winning one reaches the storage through ``land`` with an ordinary writer,
    once the other fetches of the piece have been stopped.
    """

    def __init__(self, span: PieceSpan, directory: Path | None = None, in_memory: int = 1 << 20):
        super().__init__(span)
        self._file = tempfile.SpooledTemporaryFile(max_size=in_memory, dir=str(directory) if directory else None)  # noqa: SIM115 (closed by abort)
        weakref.finalize(self, self._file.close)  # or once dropped unaborted: no temporary file left open
        self.record: PieceRecord | None = None

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        self._file.seek(offset - self.span.offset)
        self._file.write(chunk)

    def _keep(self, record: PieceRecord) -> None:
        self.record = record  # verified; stored only by ``land``

    def land(self, writer: PieceWriter, chunk: int = 1 << 20) -> None:
        """Copy the verified bytes into ``writer`` (blocking: call it from a worker thread)."""
        with self._lock:
            self._file.seek(0)
            while data := self._file.read(chunk):
                writer.write(data)

    def abort(self) -> None:
        super().abort()
        with self._lock:
            self._file.close()


class _LiveWriter:
    """A storage's writer, holding its piece's place until it commits or aborts (on the loop); superseded
    by a verified second copy, its bytes go nowhere and its commit gets the copy's record."""

    def __init__(self, storage: Storage, task: Task, span: PieceSpan):
        self.inner, self._storage, self._key = storage._writer(task, span), storage, (task.id, span.number)
        self.landed: asyncio.Future[PieceRecord | None] | None = None  # set once superseded
        storage._filling[self._key] = self

    def write(self, chunk: bytes | memoryview) -> None:
        try:
            self.inner.write(chunk)
        except PieceCorrupt:
            if self.landed is None:
                raise  # else a write after the copy superseded this one: dropped

    async def commit(self, expected_digest: str | None, *, strong: str = "") -> PieceRecord:
        if self.landed is not None:
            if (record := await self.landed) is None:
                raise StorageError(f"piece {self._key[1]}: the copy that replaced this write was not stored")
            return record
        try:
            return await self.inner.commit(expected_digest, strong=strong)
        finally:
            self.abort()

    def abort(self) -> None:
        self.inner.abort()  # after which no further byte of this writer reaches the storage
        if self._storage._filling.get(self._key) is self:
            del self._storage._filling[self._key]


class _SecondCopy(StagedPieceWriter):
    """A second write of a piece stored (or being filled) already: verified in a staging buffer, never
    in the live bytes, then dropped, or landed in place of the slower writer still filling it (superseded)."""

    def __init__(self, storage: Storage, task: Task, span: PieceSpan):
        super().__init__(span, storage.data_dir if Path(storage.data_dir).is_dir() else None)
        self._storage, self._task = storage, task

    async def commit(self, expected_digest: str | None, *, strong: str = "") -> PieceRecord:
        storage, task, landed, record = self._storage, self._task, None, None
        try:
            verified = await super().commit(expected_digest, strong=strong)
            if storage._tasks.get(task.id) is not task:
                raise NotFound(f"task {task.id[:12]} is not stored here")
            if (stored := task.pieces.get(verified.number)) is not None:
                return stored  # the live bytes are left as they are
            if (slower := storage._filling.get((task.id, verified.number))) is not None:
                landed = slower.landed = asyncio.get_running_loop().create_future()
                slower.abort()
            writer = _LiveWriter(storage, task, self.span)
            try:
                await asyncio.to_thread(self.land, writer)
            except BaseException:
                writer.abort()
                raise
            return (record := await writer.commit(verified.digest, strong=strong_of(verified)))
        finally:
            self.abort()  # drops the staging copy
            if landed is not None:
                landed.set_result(record)


@dataclass(frozen=True, slots=True)
class FileRegion:
    """A piece that lies in a file: transports can ``sendfile`` it."""

    path: Path
    offset: int
    length: int


class Storage(Plugin, abc.ABC):
    """Keeps tasks' pieces and metadata; survives restarts where it can.

    The base does what every storage would repeat: it holds the tasks (``self._tasks``,
    id -> Task, which ``open`` fills for a persistent storage), finds a task or a present
    piece or raises NotFound (``_task``, ``_present``), clips reads to the content, refuses to finish an incomplete
    task or to export an unfinished one, keeps the piece bookkeeping (``_piece_stored``)
    and maps an export's OSError to StorageError. A storage writes only what is its own:

    - ``_create(task)``: room for a new task (already stamped Running and in ``_tasks``);
      raise StorageError when there is none, and the task is dropped again;
    - ``_writer(task, span)``: a ``PieceWriter`` (usually a ``BufferedPieceWriter``) whose
      commit hands the verified record to ``_piece_stored``;
    - ``_read(task, offset, length)`` where the content is addressed by byte (a file, a
      buffer), or ``_read_piece(task, record)`` where whole pieces are kept (rows, objects);
    - ``_delete(task_id)``: drop what is kept for a task, if anything.

    ``_finished``, ``_export``, ``open``, ``close``, ``usage`` and ``piece_region`` have
    defaults to override where a storage knows better.
    """

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        self.data_dir = data_dir
        self.options = options or self.Config()
        self._tasks: dict[str, Task] = {}
        self._filling: dict[tuple[str, int], _LiveWriter] = {}  # pieces a writer fills in place

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def _task(self, task_id: str) -> Task:
        """The stored task, or NotFound."""
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id[:12]} is not stored here")
        return task

    def _present(self, task_id: str, number: int) -> tuple[Task, PieceRecord]:
        """The stored task and its piece ``number``, or NotFound when either is missing."""
        task = self._task(task_id)
        record = task.pieces.get(number)
        if record is None:
            raise NotFound(f"piece {number} of task {task_id[:12]} is not stored here")
        return task, record

    async def create(self, task: Task) -> Task:
        """Create (or return the existing) task with a known layout; a stored task of another
        length or piece length (the origin changed) is deleted and made again."""
        existing = self._tasks.get(task.id)
        if existing is not None:
            if existing.content_length == task.content_length and existing.piece_length == task.piece_length:
                return existing
            await self.delete(task.id)
        task.state = TaskState.RUNNING
        task.created_at = task.updated_at = time.time()
        self._tasks[task.id] = task
        try:
            await self._create(task)
        except BaseException:
            self._tasks.pop(task.id, None)
            raise
        return task

    @abc.abstractmethod
    async def _create(self, task: Task) -> None:
        """Make room for ``task``'s bytes (and keep its metadata, where the storage persists)."""

    def writer(self, task_id: str, span: PieceSpan) -> PieceWriter:
        """A writer of piece ``span.number``; a copy of one stored or being filled goes aside (``_SecondCopy``)."""
        task = self._task(task_id)
        if span.number in task.pieces or (task_id, span.number) in self._filling:
            return _SecondCopy(self, task, span)
        return _LiveWriter(self, task, span)

    @abc.abstractmethod
    def _writer(self, task: Task, span: PieceSpan) -> PieceWriter: ...

    def _piece_stored(self, task: Task, record: PieceRecord) -> None:
        """Record a verified piece as present (its writer's commit calls this)."""
        task.pieces[record.number] = record
        task.updated_at = time.time()

    async def read_piece(self, task_id: str, number: int) -> bytes:
        task, record = self._present(task_id, number)
        data = await self._read_piece(task, record)
        if len(data) != record.length:
            raise StorageError(f"piece {number} of task {task_id[:12]} is truncated in the {self.name} storage")
        return data

    async def _read_piece(self, task: Task, record: PieceRecord) -> bytes:
        """A present piece's bytes; by default ``_read`` of its span."""
        return await self._read(task, record.offset, record.length)

    async def _read(self, task: Task, offset: int, length: int) -> bytes:
        """``length`` bytes of ``task``'s content from ``offset`` (all of them: fewer means the
        storage lost some). By default cut from the present pieces, through ``_read_piece``."""
        if type(self)._read_piece is Storage._read_piece:
            raise NotImplementedError(f"{type(self).__qualname__} implements neither _read nor _read_piece")
        parts = []
        for number in task.layout.numbers_for_range(offset, length):
            _, record = self._present(task.id, number)
            data = await self._read_piece(task, record)
            parts.append(data[max(offset - record.offset, 0) : offset + length - record.offset])
        return b"".join(parts)

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        """Where a present piece lies on disk, for zero-copy sends; None if not a file."""
        return None

    async def read_range(self, task_id: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """The bytes [offset, offset + length), clipped to the content, in chunks: of at most
        ``READ_CHUNK`` where the storage reads by byte, one per piece where it keeps pieces."""
        task = self._task(task_id)
        end = min(offset + length, task.content_length)
        by_piece = type(self)._read is Storage._read
        while offset < end:
            if by_piece:
                n = min(end, (offset // task.piece_length + 1) * task.piece_length) - offset
            else:
                n = min(READ_CHUNK, end - offset)
            chunk = await self._read(task, offset, n)
            if len(chunk) != n:
                raise StorageError(f"task {task_id[:12]} is truncated in the {self.name} storage")
            offset += n
            yield chunk

    async def finish(self, task_id: str) -> None:
        """Mark the task complete (all pieces present); a persistent storage has it on disk by ``close``."""
        task = self._task(task_id)
        if len(task.pieces) != task.piece_count:
            raise StorageError(f"task {task_id[:12]} has {len(task.pieces)} of {task.piece_count} pieces")
        task.state = TaskState.SUCCEEDED
        await self._finished(task)

    async def _finished(self, task: Task) -> None:
        """``task`` was just marked Succeeded: persist that, where the storage persists."""
        return None

    async def delete(self, task_id: str) -> None:
        """Drop the task and its bytes; deleting a task that is not here is no error."""
        self._tasks.pop(task_id, None)
        await self._delete(task_id)

    @abc.abstractmethod
    async def _delete(self, task_id: str) -> None:
        """Drop what is kept for ``task_id`` (gone from ``_tasks`` already; perhaps never created)."""

    async def export(self, task_id: str, dest: Path) -> None:
        """Write the whole content to ``dest`` (already a temp path; the caller renames)."""
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED:
            raise NotFound(f"task {task_id[:12]} is not complete here")
        try:
            await self._export(task, dest)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror}") from None

    async def _export(self, task: Task, dest: Path) -> None:
        """By default the content through ``read_range``, written from a worker thread."""
        with open(dest, "wb") as f:
            async for chunk in self.read_range(task.id, 0, task.content_length):
                await asyncio.to_thread(f.write, chunk)

    def usage(self) -> dict[str, int]:
        """What the storage holds: its tasks and the bytes of their present pieces."""
        stored = sum(p.length for t in self._tasks.values() for p in t.pieces.values())
        return {"tasks": len(self._tasks), "bytes": stored}


# -- transports ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServedPiece:
    metadata: PieceMetadata
    data: bytes | None = None
    region: FileRegion | None = None
    release: Callable[[], None] | None = None  # called once the piece is sent (or sending failed)


PieceLookup = Callable[[str, int], Awaitable[ServedPiece]]


class PieceServer(Protocol):
    port: int

    async def close(self) -> None: ...


class PieceConnection(abc.ABC):
    """A child's connection to one parent's piece server."""

    @abc.abstractmethod
    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> PieceMetadata:
        """Stream one piece into ``sink``; raises PeerError, ProtocolError or NotFound."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def broken(self) -> bool:
        return False


class Transport(Plugin, abc.ABC):
    """Moves Vortex frames between a parent's piece server and its children.

    ``state_dir`` is a directory the plugin may keep files in (certificates, keys);
    the daemon sets it before ``serve``. ``served_address`` is the address children
    are told to use, where it is not simply the daemon's ``ip:port`` (a unix socket
    path, say). ``security`` is the daemon's ``SecurityConfig`` (mutual TLS and the
    connection bounds), also set before ``serve`` and ``connect``; None in bare use.
    """

    state_dir: Path | None = None
    security: Any = None  # damselfly.config.SecurityConfig
    # how many connections to one parent a child opens before fetches share them
    connections_per_parent: ClassVar[int] = 1

    def __init__(self, options: BaseModel | None = None):
        self.options = options or self.Config()

    def served_address(self, server: PieceServer, advertised_ip: str) -> str:
        return f"{advertised_ip}:{server.port}"

    @abc.abstractmethod
    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer: ...

    @abc.abstractmethod
    async def connect(self, address: str, timeout: float) -> PieceConnection: ...


# -- scheduling strategies -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    peer: Peer
    host: Host


class PiecePicker(Plugin, abc.ABC):
    """Orders the pieces a download still needs; a pure function of what it is handed."""

    def __init__(self, options: BaseModel | None = None):
        self.options = options or self.Config()

    @abc.abstractmethod
    def order(self, missing: set[int], holders: dict[int, float]) -> list[int]:
        """The missing pieces in the order to fetch them. ``holders`` says how many of
        the download's parents hold each piece (absent: none yet); a seed counts half,
        so a piece only a seed holds ranks rarest."""


class Strategy(Plugin, abc.ABC):
    """Ranks a child's candidate parents; a pure function of what it is handed.

    ``dag``: parents form a DAG (upstream's rule: never a parent from below), else a
    mesh where two peers may each fetch from the other, as in BitTorrent, so that a
    peer's upload is used from its first piece. ``parent_limit``: parents a child is
    given (0: ``scheduler.candidate_parent_limit``).
    """

    dag: ClassVar[bool] = True
    parent_limit: ClassVar[int] = 0

    def __init__(self, options: BaseModel | None = None):
        self.options = options or self.Config()

    @abc.abstractmethod
    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        """Best first; the scheduler takes the first ``candidate_parent_limit``."""
