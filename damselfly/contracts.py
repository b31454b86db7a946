"""The four plugin contracts: sources, transports, storages, scheduling strategies.

Each plugin is a class with ``name: ClassVar[str]`` and an optional pydantic
``Config`` model for its options; a registry hook adds the class, and the
daemon or scheduler instantiates it from config.
"""

from __future__ import annotations

import abc
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from damselfly.core.errors import InvalidArgument, PieceCorrupt
from damselfly.core.host import Host
from damselfly.core.peer import Peer
from damselfly.core.piece import DIGEST_ALGORITHM, Hasher, PieceSpan, algorithm_of, crc32, format_digest, new_hasher
from damselfly.core.task import PieceRecord, Task
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
    credential_fields: ClassVar[tuple[str, ...] | None] = None
    endpoint_fields: ClassVar[tuple[str, ...]] = ()
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
        self._file = tempfile.SpooledTemporaryFile(max_size=in_memory, dir=directory)  # noqa: SIM115 (closed by abort)
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


@dataclass(frozen=True, slots=True)
class FileRegion:
    """A piece that lies in a file: transports can ``sendfile`` it."""

    path: Path
    offset: int
    length: int


class Storage(Plugin, abc.ABC):
    """Keeps tasks' pieces and metadata; survives restarts where it can."""

    def __init__(self, data_dir: Path, options: BaseModel | None = None):
        self.data_dir = data_dir
        self.options = options or self.Config()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    def tasks(self) -> list[Task]: ...

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def create(self, task: Task) -> Task:
        """Create (or return the existing) task with a known layout."""

    @abc.abstractmethod
    def writer(self, task_id: str, span: PieceSpan) -> PieceWriter: ...

    @abc.abstractmethod
    async def read_piece(self, task_id: str, number: int) -> bytes: ...

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        """Where a present piece lies on disk, for zero-copy sends; None if not a file."""
        return None

    @abc.abstractmethod
    def read_range(self, task_id: str, offset: int, length: int) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def finish(self, task_id: str) -> None:
        """Mark the task complete (all pieces present); a persistent storage has it on disk by ``close``."""

    @abc.abstractmethod
    async def delete(self, task_id: str) -> None: ...

    @abc.abstractmethod
    async def export(self, task_id: str, dest: Path) -> None:
        """Write the whole content to ``dest`` (already a temp path; the caller renames)."""

    def usage(self) -> dict[str, int]:
        return {}


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
