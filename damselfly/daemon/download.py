"""One download in the daemon: announce, fetch from parents or the source, verify, store.

The scheduler decides between parents and the source. Whoever reads a piece from the
source computes its strong digest (``security.piece_digest``: sha256 or blake3) as the
bytes stream and reports it; a child hashes every piece from a parent as it is written
and checks it against the source reader's digest, which only the scheduler hands out
(its answer, else StatTask), before the piece is stored or served on. crc32 stays on the
Vortex wire and is checked too. A parent that sends a bad piece is blocklisted and the
piece fetched elsewhere. A task whose content has a known digest (an OCI blob's
``sha256:``, the user's ``--digest``) is hashed in order as its pieces land and is
complete only if it matches; otherwise it is deleted. Without a scheduler the daemon
goes to the source itself, with a warning.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, errordetails_pb2, scheduler_pb2
from google.protobuf import json_format
from loguru import logger

from damselfly.config import LimitsConfig
from damselfly.contracts import (
    INLINE_WRITE_LIMIT,
    DigestingWriter,
    PieceConnection,
    PieceWriter,
    Source,
    StagedPieceWriter,
    Transport,
    strong_of,
)
from damselfly.core import ids, vortex
from damselfly.core.errors import (
    BackendError,
    Busy,
    DamselflyError,
    Declined,
    InvalidArgument,
    NotFound,
    PeerError,
    PieceCorrupt,
    ProtocolError,
    StorageError,
)
from damselfly.core.host import HostType
from damselfly.core.piece import STRONG_ALGORITHMS, WEAK_ALGORITHM, Hasher, Layout, algorithm_of, new_hasher
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started, TaskRuntime
from damselfly.rpc.wire import (
    SOURCE_SHARES_METADATA,
    addresses_from_response,
    piece_to_proto,
    source_endpoint,
    source_share_from_proto,
    task_id_of,
    transports_from_metadata,
)

if TYPE_CHECKING:
    from damselfly.config import DaemonConfig
    from damselfly.daemon.daemon import Daemon

TRAFFIC_SOURCE = vortex.TrafficType.BACK_TO_SOURCE
TRAFFIC_PEER = vortex.TrafficType.REMOTE_PEER


# A seed counts as half a holder for the piece pickers: a piece only a seed holds is the
# rarest there is (the seed's link is the one way new pieces enter the swarm).
SEED_HOLDER = 0.5
DECLINED_BACKOFF = 1.0  # seconds before a parent that declined a piece is asked for it again
SOURCE_OPTION_FIELDS = ("object_storage", "hdfs", "hugging_face")
CACHE_EXPIRES_HEADER = "X-Damselfly-Cache-Expires"
# a piece whose source digest the scheduler's answer did not carry: StatTask is asked at most
# this often (one call answers every fetch waiting), and a fetch waits this long for it
STAT_INTERVAL = 0.2
AUTHORITY_WAIT = 3.0
CONTENT_DIGESTS = ("sha256", "sha512", "sha1", "md5", "crc32")
CACHE_URL_PREFIX = "damselfly-cache://"  # plugins.source.cache's scheme: the url names the content's sha256


def named_digest(url: str) -> str | None:
    """The digest a url names its content by (an OCI blob's ``sha256:``, a persistent cache
    task's sha256), which its task id is bound to; None for other urls."""
    if url.startswith(CACHE_URL_PREFIX):
        sha = url[len(CACHE_URL_PREFIX) :].partition("?")[0]
        return f"sha256:{sha}" if len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) else None
    return ids.blob_digest(url)


@dataclass
class DownloadRequest:
    """What a client asked for: the fields of Dragonfly's ``Download`` that we act on."""

    url: str
    tag: str = ""
    application: str = ""
    priority: int = 0
    filtered_query_params: list[str] = field(default_factory=list)
    request_header: dict[str, str] = field(default_factory=dict)
    piece_length: int = 0
    digest: str = ""
    output_path: str = ""
    need_back_to_source: bool = False
    disable_back_to_source: bool = False
    content_for_calculating_task_id: str = ""
    range: tuple[int, int] | None = None  # (start, length): only the pieces that overlap it
    use_blob_digest: bool = False
    # the Download's object_storage / hdfs / hugging_face messages, as dicts: source options
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, d: common_pb2.Download) -> DownloadRequest:
        return cls(
            url=d.url,
            tag=d.tag,
            application=d.application,
            priority=d.priority,
            filtered_query_params=list(d.filtered_query_params),
            request_header=dict(d.request_header),
            piece_length=d.piece_length,
            digest=d.digest,
            output_path=d.output_path,
            need_back_to_source=d.need_back_to_source,
            disable_back_to_source=d.disable_back_to_source,
            content_for_calculating_task_id=d.content_for_calculating_task_id,
            use_blob_digest=d.enable_task_id_based_blob_digest,
            range=(d.range.start, d.range.length) if d.HasField("range") and d.range.length > 0 else None,
            source_options={
                name: json_format.MessageToDict(getattr(d, name), preserving_proto_field_name=True)
                for name in SOURCE_OPTION_FIELDS
                if d.HasField(name)
            },
        )

    def to_proto(self, task: Task | None = None) -> common_pb2.Download:
        d = common_pb2.Download(
            url=self.url,
            digest=self.digest,
            type=common_pb2.TaskType.STANDARD,
            tag=self.tag,
            application=self.application,
            priority=self.priority,
            filtered_query_params=self.filtered_query_params,
            request_header=self.request_header,
            piece_length=self.piece_length,
            output_path=self.output_path,
            need_back_to_source=self.need_back_to_source,
            disable_back_to_source=self.disable_back_to_source,
            content_for_calculating_task_id=self.content_for_calculating_task_id,
            enable_task_id_based_blob_digest=self.use_blob_digest,
        )
        if self.range is not None:
            d.range.CopyFrom(common_pb2.Range(start=self.range[0], length=self.range[1]))
        for name, values in self.source_options.items():
            json_format.ParseDict(values, getattr(d, name), ignore_unknown_fields=True)
        if task is not None and task.known_length:
            d.actual_content_length = task.content_length
            d.actual_piece_length = task.piece_length
            d.actual_piece_count = task.piece_count
        return d

    def task_id(self) -> str:
        return task_id_of(
            self.url,
            tag=self.tag,
            application=self.application,
            revision=self.source_options.get("hugging_face", {}).get("revision", ""),
            piece_length=self.piece_length,
            filtered_query_params=self.filtered_query_params,
            content=self.content_for_calculating_task_id,
            blob_digest_mode=self.use_blob_digest,
            endpoint=source_endpoint(self.source_options),  # another server's answer is another task
        )


class Reschedule(Exception):
    """The current parents cannot finish the task."""


class _SchedulerGone(Exception):
    """The announce stream broke before any download from parents began: try the next scheduler."""


@dataclass
class _Parent:
    peer_id: str
    ip: str
    upload_port: int
    host_id: str = ""
    piece_addresses: dict[str, str] = field(default_factory=dict)  # transport name -> address
    weight: float = 1.0
    alive: bool = True
    synced: bool = False  # its SyncPieces stream ended normally
    is_seed: bool = False
    busy_until: float = 0.0  # it said its upload slots were taken: not asked again before then
    declined: dict[int, float] = field(default_factory=dict)  # piece -> not asked for it again before then
    pieces: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class _Fetch:
    """One fetch in flight: its piece, its parent, whether it counts as a seed's extra, when it began."""

    number: int
    parent_id: str
    from_seed: bool
    started: float


@dataclass
class _Staged:
    """An endgame copy of a piece, verified and waiting to be landed."""

    writer: StagedPieceWriter
    parent_id: str
    transport: str
    cost: float


@dataclass
class _Opening:
    """Connections being made to one parent over one transport, and a wake-up for when one is."""

    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ConnectionPool:
    """Piece connections to parents, shared across pieces and tasks, over negotiated transports.

    A parent announces the transports it serves with their addresses; the child tries
    its own transports in its configured order among those, and falls back to the
    next one, per parent, when a connection cannot be made, logging why. A transport
    that failed to a parent is not tried there again for ``retry_after`` seconds.

    Each transport says how many connections to one parent are worth having
    (``connections_per_parent``): many for TCP, where a request holds its connection,
    one for QUIC, whose streams multiplex. Beyond that, fetches share the least busy.

    Bounded (``security.limits``): at most ``max_connections`` pooled connections in all
    (past it the longest idle one is closed to make room, else fetches share or wait),
    and a connection idle for ``idle_timeout`` seconds is closed.
    """

    def __init__(
        self,
        transports: list[Transport],
        connect_timeout: float,
        retry_after: float = 60,
        *,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
    ):
        self.transports = transports
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        limits = next((t.security.limits for t in transports if t.security is not None), None) or LimitsConfig()
        self.max_connections = max_connections or limits.piece_connections
        self.idle_timeout = idle_timeout or limits.piece_idle_timeout
        self._conns: dict[str, list[PieceConnection]] = {}
        self._load: dict[PieceConnection, int] = {}  # fetches using each connection
        self._key: dict[PieceConnection, str] = {}
        self._idle: dict[PieceConnection, float] = {}  # idle since (monotonic), the longest idle first
        self._opening: dict[str, _Opening] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._room = asyncio.Event()  # set (and replaced) when a connection closes or goes idle
        self._reaper: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """Connections pooled or being made."""
        return len(self._load) + sum(o.count for o in self._opening.values())

    async def acquire(self, addresses: dict[str, str]) -> tuple[str, PieceConnection]:
        """A connection to the parent serving ``addresses`` (transport name -> address) and its pool key."""
        reasons: list[str] = []
        for t in self.transports:
            address = addresses.get(t.name)
            if address is None:
                continue
            key = f"{t.name}|{address}"
            try:
                return key, await self._acquire(t, key, address)
            except DamselflyError as exc:
                reasons.append(f"{t.name}: {exc}")
        if not reasons:
            mine = ", ".join(t.name for t in self.transports)
            theirs = ", ".join(sorted(addresses)) or "none"
            raise PeerError(f"no common transport with the parent (mine: {mine}; theirs: {theirs})")
        raise PeerError("no transport reached the parent: " + "; ".join(reasons))

    def _take(self, conn: PieceConnection) -> PieceConnection:
        self._load[conn] += 1
        self._idle.pop(conn, None)
        return conn

    async def _acquire(self, t: Transport, key: str, address: str) -> PieceConnection:
        while True:
            conns = self._conns.setdefault(key, [])  # anew each time: ``drop`` may have replaced it
            for dead in [c for c in conns if c.broken and not self._load[c]]:  # broke while idle
                await self._remove(dead)
            live = [c for c in conns if not c.broken]
            opening = self._opening.get(key)
            at_cap = len(live) + (opening.count if opening else 0) >= t.connections_per_parent
            if live and (min(self._load[c] for c in live) == 0 or at_cap):
                return self._take(min(live, key=self._load.__getitem__))  # an idle one, else the least busy
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < self.retry_after:
                raise PeerError(failed[1])
            if at_cap:
                assert opening is not None
                await opening.done.wait()  # the connections being made are all we may have: wait for one
                continue
            if self.size < self.max_connections:
                break
            if self._idle:  # the pool is full: the longest idle connection makes room
                await self._remove(next(iter(self._idle)))
                continue
            if live:
                return self._take(min(live, key=self._load.__getitem__))
            room = self._room
            await room.wait()  # every pooled connection is busy: wait for one to close or go idle
        opening = self._opening.setdefault(key, _Opening())
        opening.count += 1
        try:
            conn = await t.connect(address, self.connect_timeout)
        except DamselflyError as exc:
            self._failed[key] = (time.monotonic(), str(exc))
            logger.warning("transport {} to {} failed, trying the next one: {}", t.name, address, exc)
            raise
        finally:
            opening.count -= 1
            opening.done.set()
            opening.done = asyncio.Event()
            self._make_room()
        self._conns.setdefault(key, []).append(conn)
        self._load[conn] = 1
        self._key[conn] = key
        return conn

    def _make_room(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    async def _remove(self, conn: PieceConnection) -> None:
        key = self._key.pop(conn, None)
        if key is None:
            return
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        self._load.pop(conn, None)
        self._idle.pop(conn, None)
        self._make_room()
        await conn.close()

    async def release(self, key: str, conn: PieceConnection) -> None:
        if conn not in self._load:
            return  # dropped while this fetch ran
        self._load[conn] -= 1
        if self._load[conn]:
            return
        if conn.broken:
            await self._remove(conn)
            return
        self._idle[conn] = time.monotonic()
        self._make_room()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections idle for ``idle_timeout``; ends when none is idle."""
        while self._idle:
            conn, since = next(iter(self._idle.items()))
            wait = since + self.idle_timeout - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            logger.debug("closing a piece connection idle for {:.0f}s", self.idle_timeout)
            await self._remove(conn)

    async def drop(self, key: str) -> None:
        for conn in self._conns.pop(key, []):
            await self._remove(conn)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        for key in list(self._conns):
            await self.drop(key)


class SchedulerLink:
    """One AnnouncePeer stream; writes go through one queue so they never interleave."""

    def __init__(self, call: grpc.aio.StreamStreamCall, host_id: str, task_id: str, peer_id: str):
        self.call = call
        self.host_id, self.task_id, self.peer_id = host_id, task_id, peer_id
        self._queue: asyncio.Queue[scheduler_pb2.AnnouncePeerRequest | None] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while (req := await self._queue.get()) is not None:
                await self.call.write(req)
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream is gone; the reader side sees why and decides what to do

    def send(self, **kwargs: object) -> None:
        self._queue.put_nowait(
            scheduler_pb2.AnnouncePeerRequest(
                host_id=self.host_id, task_id=self.task_id, peer_id=self.peer_id, **kwargs
            )
        )

    async def read(self) -> scheduler_pb2.AnnouncePeerResponse | None:
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            return None
        return resp  # type: ignore[return-value]

    async def close(self) -> None:
        """Flush what is queued, half-close, and let the scheduler end the stream.

        Cancelling instead could drop the last messages (the scheduler would then
        never hear that this peer finished), so cancel only if it does not end.
        """
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), 5)
            await asyncio.wait_for(self.call.code(), 5)
        except TimeoutError:
            pass
        finally:
            self.call.cancel()


class PieceAuthority:
    """The source reader's digest of each piece, as the scheduler has it: from its answer,
    else asked with ``StatTask``. One call at a time, at most every ``interval`` seconds,
    answers every fetch waiting on a digest; a fetch waits ``wait`` seconds at most, then
    gets None (the piece is not stored: it is fetched again later). ``stat`` returns None
    when no scheduler that knows the task answers (``reachable`` is then False): the fetch
    gets None at once. A scheduler that has answered with no digest at all for ``wait``
    seconds learnt of the task from announcements only (``bare``): no fetch waits on it
    any more, until it has a digest."""

    def __init__(
        self,
        stat: Callable[[], Awaitable[common_pb2.Task | None]],
        interval: float = STAT_INTERVAL,
        wait: float = AUTHORITY_WAIT,
    ):
        self.known: dict[int, str] = {}
        self._stat = stat
        self.interval = interval
        self.wait = wait
        self.calls = 0
        self.reachable = True
        self._bare_since: float | None = None  # since when the scheduler's answers carry no digest
        self._call: asyncio.Task[None] | None = None
        self._last = -math.inf

    def learn(self, pieces: Iterable[common_pb2.Piece]) -> None:
        for pb in pieces:
            if pb.digest:
                self.known[pb.number] = pb.digest

    async def _ask(self) -> None:
        delay = self._last + self.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last = time.monotonic()
        self.calls += 1
        task = await self._stat()
        self.reachable = task is not None
        if task is not None and not any(pb.digest for pb in task.pieces):
            self._bare_since = self._bare_since if self._bare_since is not None else self._last
        else:
            self._bare_since = None
        if task is not None:
            self.learn(task.pieces)

    @property
    def bare(self) -> bool:
        return self._bare_since is not None and time.monotonic() - self._bare_since >= self.wait

    async def digest(self, number: int) -> str | None:
        """Piece ``number``'s source digest; asks the scheduler when it is not known yet."""
        asked = time.monotonic()
        while number not in self.known:
            if time.monotonic() - asked > self.wait or self.bare:
                return None
            call = self._call
            if call is None or call.done():
                self._call = call = asyncio.get_running_loop().create_task(self._ask())
            # a call that asked before the piece was reported does not know it: the loop asks again
            await asyncio.shield(call)
            if not self.reachable:
                return self.known.get(number)
        return self.known[number]

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            await asyncio.gather(self._call, return_exceptions=True)


def _content_hasher(expected: str) -> Hasher:
    algo = algorithm_of(expected).lower()
    if algo not in CONTENT_DIGESTS:
        raise InvalidArgument(f"unsupported digest {expected!r} (use sha256:, sha512:, sha1:, md5: or crc32:)")
    return new_hasher(algo) if algo == WEAK_ALGORITHM else hashlib.new(algo)


class ContentCheck:
    """A whole task's content against its known digests (an OCI blob's, the user's ``--digest``),
    hashed in piece order as pieces land, so the check at the end waits only for what landed
    last. The next piece in order is hashed as it is written (``continuation``: no second
    read); a piece that lands out of order is read back by a worker thread once the ones
    before it are in."""

    def __init__(
        self,
        read_piece: Callable[[int], Awaitable[bytes]],
        piece_count: int,
        expected: list[str],
        present: Iterable[int] = (),
    ):
        self.expected = expected
        self._hashers = [_content_hasher(e) for e in expected]
        self._read = read_piece
        self.piece_count = piece_count
        self.next = 0  # the first piece not hashed yet
        self._present: set[int] = set(present)  # stored, not hashed yet
        self._runner: asyncio.Task[None] | None = None

    def _catching_up(self) -> bool:
        return self._runner is not None and not self._runner.done()

    def continuation(self, number: int) -> list[Hasher] | None:
        """Copies of the running hashes for the writer of piece ``number`` to carry on with, as
        its bytes are written, when it is the next in order; None otherwise."""
        if number != self.next or self._catching_up():
            return None
        return [h.copy() for h in self._hashers]

    def landed(self, number: int, continued: list[Hasher] | None = None) -> None:
        """Piece ``number`` is stored; ``continued``: the ``continuation`` its writer carried on."""
        if continued is not None and number == self.next and not self._catching_up():
            self._hashers = continued
            self.next += 1
        else:
            self._present.add(number)
        if self.next in self._present and not self._catching_up():
            self._runner = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        while self.next in self._present:
            data = await self._read(self.next)
            await asyncio.to_thread(self._update, data)
            self._present.discard(self.next)
            self.next += 1

    def _update(self, data: bytes) -> None:
        for h in self._hashers:
            h.update(data)

    async def verify(self, present: Iterable[int]) -> None:
        """Hash whatever is left (``present``: every piece) and compare; PieceCorrupt on a mismatch."""
        if self._runner is not None:
            await self._runner
        self._present.update(present)
        await self._catch_up()
        if self.next != self.piece_count:
            raise PieceCorrupt(f"content digest: piece {self.next} is missing")
        for want, h in zip(self.expected, self._hashers, strict=True):
            got = h.hexdigest()
            if got.lower() != want.partition(":")[2].lower():
                raise PieceCorrupt(f"content digest mismatch: expected {want}, got {algorithm_of(want)}:{got}")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)


class Downloader:
    """Runs one task's download on behalf of the daemon; publishes progress on the runtime."""

    def __init__(self, daemon: Daemon, req: DownloadRequest, runtime: TaskRuntime):
        self.d = daemon
        self.req = req
        self.rt = runtime
        self.task_id = runtime.task_id
        self.peer_id = ids.peer_id(daemon.settings.host.ip, daemon.settings.host.hostname, seed=daemon.is_seed)
        runtime.peer_id = self.peer_id
        self.log = logger.bind(task_id=self.task_id[:12], peer_id=self.peer_id)
        self.task: Task | None = None
        self.source: Source | None = None
        self.link: SchedulerLink | None = None
        self.scheduler = ""  # the address of the scheduler this download announces to
        self.scheduler_lost = False  # it went away while parents carried the download on
        self.peer_bytes = 0
        self.source_bytes = 0
        # the strong digest this daemon computes of what it reads from the source
        self.algorithm = daemon.settings.security.piece_digest
        # digests the scheduler learnt from the source reader: every piece from a parent is checked
        self.authority = PieceAuthority(self._stat_task)
        self.authoritative = self.authority.known
        self._content: ContentCheck | None = None  # the whole content's digest, checked in order
        self._content_checked = False
        self._source_instead: set[int] = set()  # pieces no parent can attest, read from the source
        self._unattested: set[str] = set()  # parents whose pieces were taken without a digest from the scheduler
        self.blocklist: set[str] = set()
        self._todo: set[int] | None = None
        self._first_seen: dict[int, float] = {}  # when a parent first reported each piece
        self._reader: asyncio.Future[scheduler_pb2.AnnouncePeerResponse | None] | None = None
        self._add_parents: Callable[[list[common_pb2.Peer]], None] = lambda _: None
        self._poke: Callable[[], None] = lambda: None  # wakes the fetch loop (a piece landed)
        self._shares: set[asyncio.Task[None]] = set()  # reads of the pieces the scheduler handed us
        self._share_error: BaseException | None = None  # what stops the download (a full disk)
        # holders of each piece among the usable parents (a seed counting SEED_HOLDER), kept up
        # to date as they announce pieces; None when a parent went away and it must be rebuilt
        self._held: dict[int, float] | None = None
        if self.algorithm == WEAK_ALGORITHM:
            _warn_weak_digest()

    @property
    def may_read_source(self) -> bool:
        return not (self.req.disable_back_to_source or self.d.settings.daemon.disable_back_to_source)

    # -- entry -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
            assert self.task is not None
            await self._finish()
            self.rt.publish(Finished())
            self.d.plugins.task_finished(
                self.task_id, self.req.url, self.task.content_length, self.peer_bytes, self.source_bytes
            )
        except asyncio.CancelledError:
            self.rt.publish(Failed(PeerError("download cancelled")))
            raise
        except Exception as exc:  # every failure reaches the client as one clean error
            if not isinstance(exc, DamselflyError):
                self.log.exception("download failed unexpectedly")
            else:
                self.log.warning("download failed: {}", exc)
            self.d.metrics.download_task_failure.labels("standard").inc()
            self.rt.publish(Failed(exc))
        finally:
            for t in self._shares:
                t.cancel()
            await asyncio.gather(*self._shares, return_exceptions=True)
            await self.authority.close()
            if self._content is not None:
                await self._content.close()
            if self.source is not None:
                await self.source.close()

    async def _run(self) -> None:
        self.d.metrics.download_task.labels("standard").inc()
        existing = self.d.storage.get(self.task_id)
        if existing is not None and existing.known_length:
            self.task = existing
            self._started()
            needed = self._needed()
            for rec in sorted(existing.pieces.values(), key=lambda p: p.number):
                if rec.number in needed:
                    self.rt.publish(PieceEvent(rec, vortex.TrafficType.LOCAL_PEER, "", 0.0))
            if not self._missing():
                return
        if self._reads_this_node():
            # one of this node's own files: read here, never announced, so no peer is handed it
            # (nor asks this node for it) and no peer's copy stands in for it
            if not self.may_read_source:
                raise PeerError(
                    f"{self.req.url.split(':', 1)[0]}:// is read from this node's own files, never from peers, "
                    "and back-to-source is disabled"
                )
            await self._from_source(report=False)
            return
        if not self.d.schedulers.addresses:
            if not self.may_read_source:
                raise PeerError("no scheduler is configured and back-to-source is disabled")
            self.log.info("no scheduler configured: fetching {} from the source", self.req.url)
            await self._from_source(report=False)
            return
        for _ in self.d.schedulers.addresses:
            link = await self._open_link()
            if link is None:
                break
            self.link = link
            try:
                await self._with_scheduler(link)
            except _SchedulerGone as gone:
                self.d.scheduler_lost(self.scheduler)
                self.log.warning("scheduler {} went away ({}); trying the next", self.scheduler, gone)
                continue
            finally:
                await link.close()
                if self._reader is not None:  # ends with the stream; never cancelled mid-read
                    await asyncio.gather(self._reader, return_exceptions=True)
                    self._reader = None
            if self.scheduler_lost and self.task is not None and self.req.range is None:
                # finished with the parents after the scheduler died: tell the next one this
                # peer holds the task, so that later peers get it from here, not the origin
                self.d._spawn(self.d.announce_finished(self.task))
            return
        await self._source_without_scheduler(f"no scheduler answered for {self.req.url}")

    def _reads_this_node(self) -> bool:
        """The url's source reads this node's own files (file://, local://...)."""
        from urllib.parse import urlsplit

        from damselfly.security.admission import reads_this_node

        return reads_this_node(urlsplit(self.req.url).scheme)

    # -- the scheduler ------------------------------------------------------------------

    async def _open_link(self) -> SchedulerLink | None:
        picked = await self.d.schedulers.pick(self.task_id)
        if picked is None:
            return None
        self.scheduler, stub = picked
        # a daemon that may read the source offers to take a share of a new task's source read
        offer = self.may_read_source and self.req.range is None
        call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA if offer else None)
        link = SchedulerLink(call, self.d.host_id, self.task_id, self.peer_id)
        download = self.req.to_proto(self.task)
        if self.d.is_seed and self.req.need_back_to_source:
            await self._prepare_from_source()  # a seed stats the origin before it registers
            download = self.req.to_proto(self.task)
        link.send(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download))
        return link

    async def _with_scheduler(self, link: SchedulerLink) -> None:
        """Follow the scheduler's answers; a download from parents runs beside the stream,
        so parents the scheduler adds later join it while it runs."""
        fetch: asyncio.Task[None] | None = None
        fetch_parents: list[common_pb2.Peer] = []
        link_alive = True
        try:
            while True:
                if link_alive and self._reader is None:
                    self._reader = asyncio.ensure_future(link.read())
                waits = {t for t in (self._reader if link_alive else None, fetch) if t is not None}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if fetch is not None and fetch in done:
                    finished, fetch = fetch, None
                    try:
                        finished.result()
                        await self._verify_content()  # before the scheduler hears this peer holds the task
                    except Reschedule as why:
                        if not link_alive:
                            await self._source_without_scheduler(f"parents cannot finish ({why})")
                            return
                        link.send(
                            reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
                                candidate_parents=fetch_parents, description=str(why)
                            )
                        )
                        continue
                    except DamselflyError as exc:
                        if link_alive:
                            link.send(
                                download_peer_failed_request=scheduler_pb2.DownloadPeerFailedRequest(
                                    description=str(exc)
                                )
                            )
                        raise
                    if link_alive:
                        link.send(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest())
                    return
                if self._reader is None or self._reader not in done:
                    continue
                reader, self._reader = self._reader, None
                try:
                    resp = reader.result()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.UNKNOWN,
                    ):
                        raise PeerError(f"scheduler refused the download: {exc.code().name}: {exc.details()}") from None
                    link_alive = False
                    if fetch is not None:
                        self.log.warning("scheduler went away ({}): going on with the parents", exc.details())
                        self.scheduler_lost = True
                        self.d.scheduler_lost(self.scheduler)
                        continue
                    raise _SchedulerGone(exc.details()) from None
                if resp is None:
                    link_alive = False
                    if fetch is not None:
                        continue
                    raise PeerError("scheduler closed the announce stream before the download finished")
                kind = resp.WhichOneof("response")
                if kind == "normal_task_response":
                    answer = list(resp.normal_task_response.candidate_parents)
                    shares = [n for c in answer for n in source_share_from_proto(c) or ()]
                    candidates = [c for c in answer if source_share_from_proto(c) is None]
                    if fetch is not None:
                        if answer:  # the scheduler's later answers carry the source digests it has learnt since
                            self.authority.learn(answer[0].task.pieces)
                        known = {c.id for c in fetch_parents}
                        fetch_parents += [c for c in candidates if c.id not in known]
                        self._take_shares(shares)
                        self._add_parents(candidates)
                        continue
                    link.send(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())
                    fetch_parents = candidates
                    task_pb = answer[0].task if answer else common_pb2.Task()
                    fetch = asyncio.ensure_future(self._from_parents(candidates, task_pb, shares))
                    continue
                if fetch is not None:
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    fetch = None
                if kind == "empty_task_response":
                    await self._create(0, None)
                    link.send(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())
                    link.send(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest())
                    return
                if kind == "need_back_to_source_response":
                    await self._back_to_source(link, resp.need_back_to_source_response.description)
                    return
                raise PeerError(f"unexpected scheduler answer {kind}")
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _source_without_scheduler(self, why: str) -> None:
        if not self.may_read_source:
            raise PeerError(f"{why}, and back-to-source is disabled")
        self.log.warning("{}: finishing from the source", why)
        await self._from_source(report=False)

    async def _back_to_source(self, link: SchedulerLink, why: str) -> None:
        if not self.may_read_source:
            raise PeerError("scheduler sent this peer to the source, and back-to-source is disabled")
        self.log.info("back to source: {}", why)
        await asyncio.gather(*self._shares, return_exceptions=True)  # what they read is not read again
        link.send(download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest())
        try:
            await self._from_source(report=True)
            await self._verify_content()  # before the scheduler hears this peer holds the task
        except PieceCorrupt as exc:  # the source's content is not what its digest says
            link.send(
                download_peer_back_to_source_failed_request=scheduler_pb2.DownloadPeerBackToSourceFailedRequest(
                    description=str(exc)
                )
            )
            raise
        except BackendError as exc:
            link.send(
                download_piece_back_to_source_failed_request=scheduler_pb2.DownloadPieceBackToSourceFailedRequest(
                    backend=errordetails_pb2.Backend(message=str(exc), status_code=exc.status_code)
                )
            )
            link.send(
                download_peer_back_to_source_failed_request=scheduler_pb2.DownloadPeerBackToSourceFailedRequest(
                    description=str(exc)
                )
            )
            raise
        link.send(download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest())

    # -- storage and layout ----------------------------------------------------------------

    def _started(self) -> None:
        assert self.task is not None
        self._content = self._content_check()
        self.rt.publish(Started(self.task.content_length, self.task.piece_length, dict(self.task.response_header)))

    def _content_check(self) -> ContentCheck | None:
        """The digests the whole content must match: an OCI blob's own, the user's ``--digest``."""
        assert self.task is not None
        if self.req.range is not None or self.task.state is TaskState.SUCCEEDED:
            return None  # a range cannot be checked whole; a complete task was checked when it completed
        expected = [d for d in (named_digest(self.req.url), self.req.digest) if d]
        if len(expected) == 2 and expected[0].lower() == expected[1].lower():
            expected.pop()
        if not expected:
            return None
        task_id, storage = self.task_id, self.d.storage
        return ContentCheck(lambda n: storage.read_piece(task_id, n), self.task.piece_count, expected, self.task.pieces)

    async def _verify_content(self) -> None:
        """The whole content against its digests, before the task is complete; a mismatch deletes it."""
        if self._content is None or self._content_checked:
            return
        assert self.task is not None
        try:
            await self._content.verify(self.task.pieces.keys())
        except PieceCorrupt:
            self.log.error("task {} does not match its digest: deleted", self.task_id[:12])
            await self.d.storage.delete(self.task_id)
            raise
        self._content_checked = True

    async def _stat_task(self) -> common_pb2.Task | None:
        """The task as the scheduler has it, with its pieces' source digests; None when its
        scheduler is gone (another does not know the task) or does not answer."""
        if self.scheduler_lost:
            return None
        stub = await self.d.schedulers.stub_for(self.task_id)
        if stub is None:
            return None
        try:
            return await stub.StatTask(
                scheduler_pb2.StatTaskRequest(host_id=self.d.host_id, task_id=self.task_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            self.log.info("scheduler has no piece digests for the task: {}", exc.details())
            return None

    async def _create(self, content_length: int, headers: dict[str, str] | None) -> Task:
        if self.task is not None:
            if self.task.content_length != content_length:
                raise PeerError(
                    f"task {self.task_id[:12]} length changed from {self.task.content_length} to {content_length}"
                )
            return self.task
        layout = Layout.for_content(content_length, self.req.piece_length or None)
        task = Task(
            id=self.task_id,
            url=self.req.url,
            content_length=content_length,
            piece_length=layout.piece_length,
            digest=self.req.digest,
            tag=self.req.tag,
            application=self.req.application,
            filtered_query_params=list(self.req.filtered_query_params),
            response_header=dict(headers or {}),
        )
        self.task = await self.d.storage.create(task)
        self.d.metrics.tasks.set(len(self.d.storage.tasks()))
        self._started()
        return self.task

    def _needed(self) -> range:
        """The pieces this download must have: all of them, or those overlapping its range."""
        assert self.task is not None
        if self.req.range is None:
            return range(self.task.piece_count)
        start, length = self.req.range
        if start >= self.task.content_length or length <= 0:
            raise InvalidArgument(f"range {start}+{length} is outside the content ({self.task.content_length} bytes)")
        return self.task.layout.numbers_for_range(start, length)

    def _missing(self) -> set[int]:
        """Numbers of the needed pieces not stored yet (kept up to date as pieces land)."""
        assert self.task is not None
        if self._todo is None:
            self._todo = set(self._needed())
        self._todo.difference_update(self.task.pieces.keys())  # another download here may have stored some
        return self._todo

    def _writer(self, inner: PieceWriter, number: int, algorithm: str, *, in_order: bool = True) -> DigestingWriter:
        """``inner`` hashed as it is written: the piece's strong digest, and the whole content's
        digests where this piece is the next one in order."""
        also = self._content.continuation(number) if self._content is not None and in_order else None
        return DigestingWriter(inner, algorithm, number, also)

    async def _stored(
        self, record: PieceRecord, traffic: int, parent_id: str, cost: float, writer: DigestingWriter | None = None
    ) -> None:
        """A verified piece is stored: tell the hooks, the scheduler and whoever waits on it."""
        self._missing().discard(record.number)
        self.d.plugins.piece_verified(self.task_id, record.number, record.length, parent_id, int(traffic))
        self.d.metrics.download_traffic.labels("back_to_source" if traffic == TRAFFIC_SOURCE else "remote_peer").inc(
            record.length
        )
        self.d.metrics.piece_seconds.observe(cost)
        if traffic == TRAFFIC_SOURCE:
            self.source_bytes += record.length
        else:
            self.peer_bytes += record.length
        if self._content is not None:
            self._content.landed(record.number, writer.also if writer is not None and writer.also else None)
        if self.link is not None:
            piece = piece_to_proto(record, int(traffic), parent_id, cost)
            piece.digest = strong_of(record) or record.digest  # the digest children check
            if traffic == TRAFFIC_SOURCE:
                self.link.send(
                    download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                        piece=piece
                    )
                )
            else:
                self.link.send(download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(piece=piece))
        self.rt.publish(PieceEvent(record, int(traffic), parent_id, cost))
        self._poke()
        self.d.offer_pieces(self.task)  # a super-seeding seed tells one child of the new piece

    async def _finish(self) -> None:
        """A whole task is marked complete once its content digest checked; a range just ends."""
        assert self.task is not None
        if self.task.state is not TaskState.SUCCEEDED and len(self.task.pieces) == self.task.piece_count:
            if self.req.range is None:
                await self._verify_content()
            expires = self.req.request_header.get(CACHE_EXPIRES_HEADER)
            if expires:  # a replica of a persistent cache task keeps it until then, not by LRU
                try:
                    self.task.expires_at = float(expires)
                except ValueError:
                    self.log.warning("ignoring a bad {} header {!r}", CACHE_EXPIRES_HEADER, expires)
            await self.d.storage.finish(self.task_id)
        elif self.req.digest and self.req.range is None and not self._content_checked:
            await self.d.check_digest(self.task, self.req.digest)  # complete before this download: read it

    # -- back to source -------------------------------------------------------------------------

    async def _prepare_from_source(self) -> None:
        if self.task is not None and self.task.known_length:
            return
        self.source = self.d.plugins.make_source(self.req.url, self.req.source_options)
        info = await self.source.stat(self.req.url, self.req.request_header)
        if info.content_length < 0:
            raise BackendError(f"origin gives no content length for {self.req.url}")
        await self._create(info.content_length, info.headers)

    async def _from_source(self, *, report: bool) -> None:
        await self._prepare_from_source()
        if self.source is None:
            self.source = self.d.plugins.make_source(self.req.url, self.req.source_options)
        if not report:
            self.link = None
        await self._read_source(sorted(self._missing()))

    async def _read_source(self, missing: list[int]) -> None:
        """Read pieces ``missing`` (sorted) from the source, storing and reporting each once whole."""
        assert self.task is not None
        cfg = self.d.settings.daemon
        width = cfg.source_reads(len(missing) * self.task.layout.piece_length)
        # With source_stream, a few long reads, each cutting pieces as its bytes arrive: fewer
        # requests for the origin, and no gap between one piece's last byte and the next one's first.
        runs = source_runs(missing, width) if cfg.source_stream else [[n] for n in missing]
        limit = asyncio.Semaphore(width)

        async def one(run: list[int]) -> None:
            async with limit:
                await self._source_run(run)

        await _gather_or_cancel([one(run) for run in runs])

    async def _source_run(self, numbers: list[int]) -> None:
        """Read consecutive pieces ``numbers`` from the source in one request, storing each once whole."""
        assert self.source is not None
        assert self.task is not None
        spans = [self.task.layout.span(n) for n in numbers]
        start, end = spans[0].offset, spans[-1].end
        started = time.monotonic()
        storage = self.d.storage
        i, pos = 0, start
        # the strong digest is computed in the same pass as the write and the crc32
        writer = self._writer(storage.writer(self.task_id, spans[0]), spans[0].number, self.algorithm)
        inline = True  # the page cache takes a chunk in microseconds: cheaper than a thread hop
        try:
            async for chunk in self.source.read(self.req.url, start, end - start, self.req.request_header):
                view = memoryview(chunk)
                while view and i < len(spans):
                    take = min(len(view), spans[i].end - pos)
                    if inline:
                        began = time.perf_counter()
                        writer.write(view[:take])
                        # a slow write (a disk under writeback, a slow storage) sends the rest
                        # of this read's writes to a worker thread, off the event loop
                        inline = time.perf_counter() - began <= INLINE_WRITE_LIMIT
                    else:
                        await asyncio.to_thread(writer.write, view[:take])
                    view, pos = view[take:], pos + take
                    if pos == spans[i].end:
                        record = await writer.commit(None)
                        now = time.monotonic()
                        await self._stored(record, TRAFFIC_SOURCE, "", now - started, writer)
                        started, i = now, i + 1
                        if i < len(spans):
                            writer = self._writer(
                                storage.writer(self.task_id, spans[i]), spans[i].number, self.algorithm
                            )
            if i < len(spans):
                raise BackendError(f"the source ended {end - pos} bytes short of {self.req.url}")
        except BaseException:
            writer.abort()
            raise

    # -- from parents ------------------------------------------------------------------------------

    def _sharing(self) -> bool:
        return any(not t.done() for t in self._shares)

    def _take_shares(self, numbers: list[int]) -> None:
        """Read the pieces the scheduler handed this peer from the source, beside the fetches."""
        assert self.task is not None
        wanted = sorted(n for n in set(numbers) if n in self._missing())
        if not wanted:
            return
        if not self.may_read_source:  # the scheduler should not have: let it hand them on
            self._share_failed(wanted, BackendError("back-to-source is disabled on this daemon"))
            return
        self.log.info("reading {} pieces of the task from the source, a share of its one read", len(wanted))
        t = asyncio.get_running_loop().create_task(self._read_share(wanted))
        self._shares.add(t)
        t.add_done_callback(lambda _: self._poke())

    async def _read_share(self, numbers: list[int]) -> None:
        try:
            if self.source is None:
                self.source = self.d.plugins.make_source(self.req.url, self.req.source_options)
            await self._read_source(numbers)
        except StorageError as exc:  # a full disk is this download's end, not the source's fault
            self._share_error = exc
        except (DamselflyError, OSError, TimeoutError) as exc:
            self._share_failed([n for n in numbers if n in self._missing()], exc)

    def _share_failed(self, numbers: list[int], exc: BaseException) -> None:
        """Tell the scheduler; it hands the rest of the share on, and the pieces come from a parent."""
        self.log.warning("source share failed ({} pieces left): {}", len(numbers), exc)
        self._source_instead.difference_update(numbers)  # parents may serve them after all
        if self.link is not None and numbers:
            self.link.send(
                download_piece_back_to_source_failed_request=scheduler_pb2.DownloadPieceBackToSourceFailedRequest(
                    piece_number=numbers[0],
                    backend=errordetails_pb2.Backend(message=str(exc), status_code=getattr(exc, "status_code", 0)),
                )
            )

    async def _from_parents(
        self, candidates: list[common_pb2.Peer], task_pb: common_pb2.Task, shares: list[int]
    ) -> None:
        """Fetch from ``candidates`` (the task as the scheduler knows it: ``task_pb``) while the
        pieces in ``shares`` are read from the source."""
        if not candidates and not shares and not self._sharing():
            raise Reschedule("no candidate parents")
        self.authority.learn(task_pb.pieces)
        if self.task is None:
            if task_pb.content_length or task_pb.piece_count:
                await self._create(task_pb.content_length, None)
            else:  # the scheduler has not learnt the length: ask the parents themselves
                await self._create(await self._stat_parents(candidates), None)
        parents: dict[str, _Parent] = {}
        wake = asyncio.Event()

        def add(more: list[common_pb2.Peer]) -> None:
            """Take on parents (at the start, and as the scheduler offers more) and follow each."""
            for c in more:
                if c.id in parents or c.id in self.blocklist:
                    continue
                p = parents[c.id] = _Parent(
                    c.id,
                    c.host.ip,
                    c.host.port,
                    c.host.id,
                    weight=_weight(c.host),
                    is_seed=c.host.type != HostType.NORMAL.value,
                )
                p.task = asyncio.get_running_loop().create_task(self._sync(p, wake.set))
                self.log.info("parent: {} (weight {:.3g})", p.peer_id, p.weight)
            wake.set()

        add(candidates)
        self._take_shares(shares)
        if not parents and not self._sharing():
            raise Reschedule("every candidate parent is blocklisted")
        self._add_parents = add
        self._poke = wake.set
        try:
            await self._fetch_loop(parents, wake)
        finally:
            self._add_parents = lambda _: None
            self._poke = lambda: None
            for p in parents.values():
                if p.task:
                    p.task.cancel()
            await asyncio.gather(*(p.task for p in parents.values() if p.task), return_exceptions=True)

    async def _stat_parents(self, candidates: list[common_pb2.Peer]) -> int:
        """The content length as a parent holds it (it may still be statting the source)."""
        deadline = time.monotonic() + self.d.settings.daemon.schedule_timeout
        while True:
            for c in candidates:
                stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(self.d.upload_channel(f"{c.host.ip}:{c.host.port}"))
                try:
                    task = await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=self.task_id), timeout=5)
                    return task.content_length
                except grpc.aio.AioRpcError:
                    continue
            if time.monotonic() > deadline:
                raise Reschedule("no parent could say how long the task is")
            await asyncio.sleep(0.1)  # a parent that is statting the source will know soon

    async def _sync(self, parent: _Parent, poke: Callable[[], None]) -> None:
        """Follow a parent's SyncPieces stream: which of our missing pieces it has, as they land."""
        interested = sorted(self._missing())
        try:
            channel = self.d.upload_channel(f"{parent.ip}:{parent.upload_port}")
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
            call = stub.SyncPieces(
                dfdaemon_pb2.SyncPiecesRequest(
                    host_id=self.d.host_id, task_id=self.task_id, interested_piece_numbers=interested
                )
            )
            announced = transports_from_metadata(await call.initial_metadata())
            held = self.rt.held.setdefault(parent.host_id, set()) if parent.host_id else set()
            async for resp in call:
                parent.piece_addresses = announced or addresses_from_response(resp)
                if resp.number not in parent.pieces:
                    parent.pieces.add(resp.number)
                    if self._held is not None and parent.alive and parent.peer_id not in self.blocklist:
                        self._held[resp.number] = self._held.get(resp.number, 0) + _holding(parent)
                held.add(resp.number)
                self._first_seen.setdefault(resp.number, time.monotonic())
                poke()
            parent.synced = True
        except grpc.aio.AioRpcError as exc:
            self.log.info("parent {} stopped answering SyncPieces: {}", parent.peer_id, exc.details())
            parent.alive = False
            self._held = None
        finally:
            poke()

    async def _fetch_loop(self, parents: dict[str, _Parent], wake: asyncio.Event) -> None:
        assert self.task is not None
        cfg = self.d.settings.daemon
        inflight: dict[asyncio.Task[_Staged | None], _Fetch] = {}
        load: dict[str, int] = {}  # pieces in flight from each parent
        tried: dict[int, set[str]] = {}
        last_progress = time.monotonic()
        self._held = None  # these parents' holders of each piece, built on the first pass

        def slots() -> tuple[bool, bool]:
            from_seeds = sum(f.from_seed for f in inflight.values())
            return fetch_slots(len(inflight), from_seeds, cfg, sharing=self._sharing())

        def askable(p: _Parent, number: int, now: float) -> bool:
            return number in p.pieces and p.busy_until <= now and p.declined.get(number, 0.0) <= now

        def start(parent: _Parent, number: int, now: float, *, staged: bool = False) -> None:
            t = asyncio.get_running_loop().create_task(self._parent_piece(parent, number, staged=staged))
            # an endgame copy counts against concurrent_pieces, whoever serves it
            inflight[t] = _Fetch(number, parent.peer_id, parent.is_seed and not staged, now)
            load[parent.peer_id] = load.get(parent.peer_id, 0) + 1

        try:
            while True:
                if self._share_error is not None:
                    raise self._share_error
                missing = self._missing()
                if not missing:
                    return
                now = time.monotonic()
                next_ready = 1.0
                peers_full, full = slots()
                usable = [p for p in parents.values() if p.alive and p.peer_id not in self.blocklist]
                later: list[float] = []
                if not full:  # else only a fetch ending can let another start: nothing to choose
                    # parents that said "busy", or declined a piece, are asked again at these times
                    later = [p.busy_until for p in usable if p.busy_until > now]
                    later += [t for p in usable for n, t in p.declined.items() if t > now and n in missing]
                    if later:
                        next_ready = min(next_ready, min(later) - now)
                    if peers_full:
                        choosable = [p for p in usable if p.is_seed]
                        held_by = _holders(choosable)
                    else:
                        choosable = usable
                        if self._held is None:  # kept up to date as parents announce pieces
                            self._held = _holders(usable)
                        held_by = self._held
                    fetching = {f.number for f in inflight.values()}
                    wanted = (held_by.keys() & missing) - fetching - self._source_instead
                    # Only parents not backing off can be asked, so only their pieces are walked:
                    # with every parent busy a pass costs next to nothing.
                    ready = [p for p in choosable if p.busy_until <= now]
                    reachable = wanted
                    if len(ready) < len(choosable):
                        reachable = wanted & set().union(*(p.pieces for p in ready))
                    for number in self.d.picker.order(reachable, held_by) if ready else ():
                        peers_full, full = slots()
                        if full:
                            break
                        asked = tried.get(number, _NOBODY)
                        holders = [
                            p
                            for p in ready
                            if number in p.pieces
                            and p.declined.get(number, 0.0) <= now
                            and p.peer_id not in asked
                            and (p.is_seed or not peers_full)
                        ]
                        if not holders:
                            continue
                        # Upstream's gather window: give the other parents a moment to report the
                        # piece too, so the choice below is among all who have it, not the fastest.
                        age = now - self._first_seen.get(number, now)
                        if age < cfg.parent_gather_window and any(
                            not p.synced and number not in p.pieces for p in usable
                        ):
                            next_ready = min(next_ready, cfg.parent_gather_window - age)
                            continue
                        # the least busy of them (pieces we are fetching from it), then by free upload
                        fewest = min(load.get(p.peer_id, 0) for p in holders)
                        holders = [p for p in holders if load.get(p.peer_id, 0) == fewest]
                        parent = random.choices(holders, weights=[max(p.weight, 1e-9) for p in holders])[0]
                        tried.setdefault(number, set()).add(parent.peer_id)
                        start(parent, number, now)
                    peers_full, full = slots()
                    if cfg.endgame_duplicates and not peers_full and endgame(missing, inflight.values()):
                        # Endgame: every missing piece is being fetched, and slots are free. The
                        # pieces in flight longest get one more fetch each, from another holder,
                        # into a staged writer; the first copy in wins, the rest are cancelled.
                        for number in endgame_order(list(inflight.values()), cfg.endgame_duplicates):
                            if slots()[0]:
                                break
                            asked = {f.parent_id for f in inflight.values() if f.number == number}
                            holders = [p for p in usable if askable(p, number, now) and p.peer_id not in asked]
                            if holders:
                                start(
                                    min(holders, key=lambda p: (load.get(p.peer_id, 0), random.random())),
                                    number,
                                    now,
                                    staged=True,
                                )
                                self.d.metrics.endgame_fetches.inc()
                        peers_full, full = slots()
                if not inflight and not self._sharing():  # a share being read is progress too
                    # (a seed whose share came with no parent waits for the scheduler's offers)
                    if parents and all(p.synced for p in usable) and not later:
                        raise Reschedule(
                            f"{len(missing)} pieces missing and no live parent has them "
                            f"({len(parents) - len(usable)} of {len(parents)} parents failed)"
                        )
                    for n in missing:  # a parent still syncing may offer a piece again later
                        tried.pop(n, None)
                # A piece in flight is progress, however slowly it comes (a busy parent shares its
                # link); a fetch that stalls ends at piece_timeout and counts as the parent's failure.
                if inflight or self._sharing():
                    last_progress = time.monotonic()
                if time.monotonic() - last_progress > cfg.schedule_timeout:
                    raise Reschedule(f"no piece arrived for {cfg.schedule_timeout:.0f}s")
                waiters: set[asyncio.Future[object]] = set(inflight)  # type: ignore[arg-type]
                waiter = None
                # a new piece at a parent, or a parent gone, matters only with a free slot; a share
                # read ending frees the slots it held back
                if not full or (cfg.share_concurrent_pieces and self._sharing()):
                    waiter = asyncio.ensure_future(wake.wait())
                    waiters.add(waiter)
                done, _ = await asyncio.wait(waiters, timeout=next_ready, return_when=asyncio.FIRST_COMPLETED)
                wake.clear()  # nothing ran since the wait returned: the next pass sees every change
                if waiter is not None:
                    waiter.cancel()
                for t in [t for t in done if t in inflight]:
                    fetch = inflight.pop(t)  # type: ignore[arg-type]
                    number, parent_id = fetch.number, fetch.parent_id
                    load[parent_id] -= 1
                    held = parents.get(parent_id)
                    if held is not None and (t.cancelled() or not isinstance(t.exception(), Busy)):
                        # our fetch from it ended, so one of its upload slots is free: a parent that
                        # answered busy is asked again now, not busy_backoff later (on a fast link
                        # a piece takes milliseconds, and a fixed pause idled it most of the time)
                        held.busy_until = 0.0
                    if t.cancelled():
                        continue  # an endgame loser
                    exc = t.exception()
                    if isinstance(exc, Busy | Declined):
                        tried.get(number, set()).discard(parent_id)  # ask it again once it has a slot
                        continue
                    if exc is None:
                        last_progress = time.monotonic()
                        tried.pop(number, None)
                        # the other fetches of this piece lose: stopped (their writers aborted) before
                        # a staged winner's bytes go into the task
                        losers = [other for other, f in inflight.items() if f.number == number]
                        for other in losers:
                            other.cancel()
                        if losers:
                            await asyncio.gather(*losers, return_exceptions=True)
                        staged = t.result()
                        if staged is not None:
                            await self._land(staged)
                        continue
                    if isinstance(exc, StorageError) or not isinstance(exc, DamselflyError | TimeoutError | OSError):
                        raise exc  # a full disk is not the parent's fault: stop with that error
        finally:
            for t in inflight:
                t.cancel()
            for result in await asyncio.gather(*inflight, return_exceptions=True):
                if isinstance(result, _Staged):
                    result.writer.abort()  # a copy that finished as the download ended: dropped

    async def _land(self, staged: _Staged) -> None:
        """An endgame copy won: its verified bytes go into the task through an ordinary writer."""
        assert self.task is not None
        try:
            if staged.writer.span.number in self.task.pieces:
                return  # stored meanwhile (another download of this task here)
            writer = self.d.storage.writer(self.task_id, staged.writer.span)
            try:
                await asyncio.to_thread(staged.writer.land, writer)
                verified = staged.writer.record
                assert verified is not None
                record = await writer.commit(verified.digest, strong=strong_of(verified))
            except BaseException:
                writer.abort()
                raise
        finally:
            staged.writer.abort()  # drops the temporary copy
        self.d.metrics.transport_traffic.labels(staged.transport).inc(record.length)
        await self._stored(record, TRAFFIC_PEER, staged.parent_id, staged.cost)

    async def _parent_piece(self, parent: _Parent, number: int, *, staged: bool = False) -> _Staged | None:
        """Fetch ``number`` from ``parent`` and store it; a ``staged`` (endgame) copy is verified
        but left for the fetch loop to ``_land`` once the other fetches of the piece stopped.

        The piece is hashed as it is written and committed only if its strong digest is the
        source reader's (the scheduler's answer, else StatTask); its crc32 must match the
        Vortex header too. A mismatch is the parent's lie: it is blocklisted."""
        assert self.task is not None
        span = self.task.layout.span(number)
        pool = self.d.pool
        key = ""
        started = time.monotonic()
        known = self.authority.known.get(number)
        # hashed with the source reader's algorithm where known (it may be a seed configured otherwise)
        algorithm = algorithm_of(known) if known else self.algorithm
        if algorithm not in (*STRONG_ALGORITHMS, WEAK_ALGORITHM):
            algorithm = self.algorithm  # an unknown digest cannot match: the check below refuses the piece
        inner: PieceWriter = (
            StagedPieceWriter(span, self.d.settings.daemon.data_dir)
            if staged
            else self.d.storage.writer(self.task_id, span)
        )
        writer = self._writer(inner, number, algorithm, in_order=not staged)
        conn: PieceConnection | None = None
        try:
            key, conn = await pool.acquire(parent.piece_addresses)
            meta = await asyncio.wait_for(
                conn.fetch(self.task_id, number, writer), self.d.settings.daemon.piece_timeout
            )
            if meta.offset != span.offset or meta.length != span.length:
                raise ProtocolError(
                    f"parent's piece {number} lies at {meta.offset}+{meta.length}, expected {span.offset}+{span.length}"
                )
            expected = known or await self.authority.digest(number)
            if expected is None and not (parent.is_seed or self._content_named):
                if self.scheduler_lost and self.may_read_source and number not in self._source_instead:
                    # no scheduler will ever name this piece's digest: the source is the one
                    # place left to take it from (a seed whose scheduler died mid-task, say)
                    self._source_instead.add(number)
                    self._take_shares([number])
                # not stored unverified: fetched again once the scheduler knows it
                raise Declined(f"the scheduler has no source digest for piece {number} yet")
            if expected is None:
                # No scheduler has the digest (gone, or it learnt of the task from announcements only).
                # A seed is the source reader the scheduler named (under TLS only seed certificates
                # announce seed hosts): its own pieces are the source's. A task named by its content's
                # digest (a cache task, an OCI blob) is checked whole against it before it completes.
                self._unverified_parent(parent)
                record = await writer.commit(meta.digest)
            elif algorithm_of(expected) != algorithm:
                raise Declined(f"piece {number} was hashed with {algorithm}, the source's digest is {expected}")
            elif algorithm == WEAK_ALGORITHM and meta.digest != expected:
                raise PieceCorrupt(f"parent's digest {meta.digest} for piece {number} is not the source's {expected}")
            else:
                record = await writer.commit(meta.digest, expected_strong=expected)
        except (PieceCorrupt, ProtocolError) as exc:
            writer.abort()
            if conn is not None:
                await conn.close()  # a parent that lies is not asked again on this connection
            self._parent_failed(parent, number, f"bad piece: {exc}", block=True)
            raise
        except Declined:
            writer.abort()  # a peer has it: ask another, or this one again later; not its failure
            parent.declined[number] = time.monotonic() + DECLINED_BACKOFF
            raise
        except Busy:
            writer.abort()
            parent.busy_until = time.monotonic() + self.d.settings.daemon.busy_backoff
            raise
        except NotFound as exc:
            writer.abort()
            parent.pieces.discard(number)
            self._held = None
            self._parent_failed(parent, number, str(exc), block=False)
            raise
        except (PeerError, TimeoutError, OSError) as exc:
            writer.abort()
            parent.alive = False
            self._held = None
            if key:
                await pool.drop(key)
            self._parent_failed(parent, number, f"parent failed: {exc or 'timeout'}", block=False)
            raise
        except BaseException:  # a cancelled fetch leaves its connection broken where that matters (tcp)
            writer.abort()
            raise
        finally:
            if conn is not None:
                await pool.release(key, conn)
        if isinstance(inner, StagedPieceWriter):
            return _Staged(inner, parent.peer_id, key.partition("|")[0], time.monotonic() - started)
        self.d.metrics.transport_traffic.labels(key.partition("|")[0]).inc(record.length)
        await self._stored(record, TRAFFIC_PEER, parent.peer_id, time.monotonic() - started, writer)
        return None

    @property
    def _content_named(self) -> bool:
        """The whole content is checked, before the task completes, against the digest its url names."""
        return self._content is not None and named_digest(self.req.url) is not None

    def _unverified_parent(self, parent: _Parent) -> None:
        if parent.peer_id not in self._unattested:
            self._unattested.add(parent.peer_id)
            self.log.warning(
                "no scheduler has the source's piece digests: taking {} {}'s pieces on crc32{}",
                "seed" if parent.is_seed else "parent",
                parent.peer_id,
                "" if parent.is_seed else ", the whole content checked against its digest",
            )

    def _parent_failed(self, parent: _Parent, number: int, reason: str, *, block: bool) -> None:
        self.log.warning("piece {} from parent {}: {}", number, parent.peer_id, reason)
        self.d.metrics.piece_failures.labels("corrupt" if block else "parent").inc()
        self.d.plugins.piece_failed(self.task_id, number, parent.peer_id, reason)
        if block:
            self.blocklist.add(parent.peer_id)
            self._held = None
        if self.link is not None:
            self.link.send(
                download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
                    piece_number=number, parent_id=parent.peer_id, temporary=not block
                )
            )


_NOBODY: frozenset[str] = frozenset()


@functools.cache
def _warn_weak_digest() -> None:
    """Once per process: the piece digest is crc32."""
    logger.warning("security.piece_digest is crc32, upstream's weak mode: a parent can forge a piece that passes it")


def _holding(p: _Parent) -> float:
    """What a parent counts for in a piece's rarity: a seed half a holder (it offers its
    pieces to all), a peer one."""
    return SEED_HOLDER if p.is_seed else 1


def _holders(parents: list[_Parent]) -> dict[int, float]:
    held: dict[int, float] = {}
    for p in parents:
        w = _holding(p)
        for n in p.pieces:
            held[n] = held.get(n, 0) + w
    return held


def _weight(host: common_pb2.Host) -> float:
    """Free upload bandwidth, the weight of a parent in per-piece choice."""
    free = host.network.max_tx_bandwidth - host.network.tx_bandwidth
    return float(max(free, 1))


def fetch_slots(in_flight: int, from_seeds: int, cfg: DaemonConfig, *, sharing: bool) -> tuple[bool, bool]:
    """(ordinary slots full, every slot full) for a download with ``in_flight`` fetches from
    parents, ``from_seeds`` of them from seeds.

    A download has concurrent_pieces ordinary slots (share_concurrent_pieces while it reads a
    share of the source, so that more of its link goes to pieces new to the swarm), and
    seed_extra_pieces more that only fetches from a seed may take, so that a seed's new piece
    (offered to this child alone) never waits for a slot. A fetch from a seed takes an extra
    slot while one is free, an ordinary one after that.
    """
    limit = cfg.concurrent_pieces
    if sharing and cfg.share_concurrent_pieces:
        limit = min(limit, cfg.share_concurrent_pieces)
    extra = min(from_seeds, cfg.seed_extra_pieces)
    ordinary_full = in_flight - extra >= limit
    return ordinary_full, ordinary_full and extra >= cfg.seed_extra_pieces


def endgame(missing: set[int], fetches: Iterable[_Fetch]) -> bool:
    """Whether a download is in its endgame: every piece it misses is in flight.

    Not before: while a missing piece is held by no parent yet (mid-download, the swarm
    short of pieces), a second fetch of a piece in flight moves the same bytes twice, and
    the loser's cancelled connection has to be opened again; that cost the daemons a third
    more piece transfers in a loopback swarm.
    """
    return missing <= {f.number for f in fetches}


def endgame_order(fetches: list[_Fetch], duplicates: int) -> list[int]:
    """Pieces in flight with fewer than 1 + ``duplicates`` fetches, the longest in flight first."""
    first: dict[int, float] = {}
    count: dict[int, int] = {}
    for f in fetches:
        first[f.number] = min(first.get(f.number, f.started), f.started)
        count[f.number] = count.get(f.number, 0) + 1
    return sorted((n for n in first if count[n] <= duplicates), key=first.__getitem__)


def source_runs(numbers: list[int], width: int) -> list[list[int]]:
    """Sorted piece numbers as at most ``width`` runs of consecutive pieces (more where they have gaps).

    The runs are read from the source at once, so a whole task becomes ``width``
    long reads of about equal length rather than one request per piece.
    """
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    while len(runs) < width:
        longest = max(range(len(runs)), key=lambda r: len(runs[r]), default=None)
        if longest is None or len(runs[longest]) < 2:
            break
        run = runs[longest]
        half = len(run) // 2
        runs[longest : longest + 1] = [run[:half], run[half:]]
    return runs


async def _gather_or_cancel(coros: list) -> None:  # type: ignore[type-arg]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
