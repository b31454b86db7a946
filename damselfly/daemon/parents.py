"""A download's fetch from its parents: follow what each holds, fetch pieces, verify them, report the liars.

The ``Planner`` decides which piece to fetch from which parent; ``ParentFetch`` carries its
decisions out. Each parent's SyncPieces stream says which pieces it holds as they land;
each piece is fetched over a pooled connection into a writer that hashes it, and is
committed only if its strong digest is the source reader's (the scheduler's answer, else
StatTask) and its crc32 the Vortex header's. A parent that sends a bad piece is
blocklisted and the piece fetched elsewhere. Endgame copies are staged aside; the first
copy in lands, the others are cancelled. A fetch that moves no bytes for
``stall_timeout`` is cancelled (``Stalled``) and the piece asked of another holder; a
download that moves none that long asks for other parents, then fails saying why
(the planner decides). Each step goes into the download's piece timeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2

from damselfly.contracts import DigestingWriter, PieceConnection, PieceWriter, StagedPieceWriter, strong_of
from damselfly.core import vortex
from damselfly.core.errors import (
    Busy,
    DamselflyError,
    Declined,
    NotFound,
    PeerError,
    PieceCorrupt,
    ProtocolError,
    StorageError,
)
from damselfly.core.host import HostType
from damselfly.core.piece import STRONG_ALGORITHMS, WEAK_ALGORITHM, algorithm_of
from damselfly.daemon.planner import Fetch, Outcome, Parent, Planner, Stall, fetch_stalled, parent_weight
from damselfly.rpc.wire import addresses_from_response, transports_from_metadata

if TYPE_CHECKING:
    from loguru import Logger

    from damselfly.core.task import PieceRecord, Task
    from damselfly.daemon.download_context import DownloadContext
    from damselfly.daemon.runtime import TaskRuntime
    from damselfly.daemon.schedlink import PieceAuthority

TRAFFIC_PEER = vortex.TrafficType.REMOTE_PEER


class Reschedule(Exception):
    """The current parents cannot finish the task."""


class Stalled(DamselflyError):
    """A parent accepted a piece request and moved no bytes of it for stall_timeout."""


class _Moving:
    """A ``PieceWriter`` that remembers when bytes last went through it (from any thread); ``last``
    is the fetch's start until the first bytes come."""

    def __init__(self, inner: PieceWriter, now: float):
        self.inner = inner
        self.last = now
        self.wrote = False

    def write(self, chunk: bytes | memoryview) -> None:
        self.inner.write(chunk)
        self.last = time.monotonic()
        self.wrote = True

    async def commit(self, expected_digest: str | None, *, strong: str = "") -> PieceRecord:
        return await self.inner.commit(expected_digest, strong=strong)

    def abort(self) -> None:
        self.inner.abort()


class Downloading(Protocol):
    """What a fetch from parents needs of the download it works for."""

    @property
    def task(self) -> Task | None: ...
    @property
    def source_instead(self) -> set[int]: ...  # pieces no parent can attest, read from the source
    @property
    def share_error(self) -> BaseException | None: ...  # what stops the download (a full disk)
    @property
    def scheduler_lost(self) -> bool: ...  # its scheduler went away while parents carried on
    @property
    def may_read_source(self) -> bool: ...
    @property
    def content_named(self) -> bool: ...  # the whole content is checked against the digest its url names

    def missing(self) -> set[int]: ...
    def sharing(self) -> bool: ...
    def take_shares(self, numbers: list[int]) -> None: ...
    def writer(self, inner: PieceWriter, number: int, algorithm: str, *, in_order: bool = True) -> DigestingWriter: ...
    def stored(
        self, record: PieceRecord, traffic: int, parent_id: str, cost: float, writer: DigestingWriter | None = None
    ) -> Awaitable[None]: ...
    def report(self, **message: Any) -> None: ...  # an AnnouncePeerRequest field to the scheduler, if one listens


@dataclass
class Staged:
    """An endgame copy of a piece, verified and waiting to be landed."""

    writer: StagedPieceWriter
    parent_id: str
    transport: str
    cost: float


def outcome_of(t: asyncio.Task[Any]) -> Outcome:
    """How a finished fetch ended, as the planner counts it."""
    if t.cancelled():
        return Outcome.CANCELLED
    exc = t.exception()
    if exc is None:
        return Outcome.STORED
    if isinstance(exc, Busy):
        return Outcome.BUSY
    if isinstance(exc, Declined):
        return Outcome.DECLINED
    if isinstance(exc, Stalled):
        return Outcome.STALLED
    return Outcome.FAILED


class ParentFetch:
    """Fetches a download's missing pieces from the parents the scheduler names, a round at a time.

    ``runtime``: the download's runtime: its record of which host holds which pieces, kept
    up to date here, and its piece timeline."""

    def __init__(
        self,
        download: Downloading,
        task_id: str,
        ctx: DownloadContext,
        planner: Planner,
        authority: PieceAuthority,
        runtime: TaskRuntime,
        log: Logger,
    ):
        self.download = download
        self._task_id = task_id
        self.ctx = ctx
        self.cfg = ctx.config
        self.planner = planner
        self.authority = authority
        self.runtime = runtime
        self.held = runtime.held
        self._moving: dict[Fetch, _Moving] = {}  # the writers of the fetches in flight, for stall checks
        self.log = log
        self._syncs: dict[str, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None  # set while a round runs: wakes its loop
        self._unattested: set[str] = set()  # parents whose pieces were taken without a digest from the scheduler

    @property
    def _task(self) -> Task:
        task = self.download.task
        assert task is not None
        return task

    def poke(self) -> None:
        """Wake the fetch loop (a piece landed, a share read ended); nothing while no round runs."""
        if self._wake is not None:
            self._wake.set()

    def add(self, candidates: list[common_pb2.Peer]) -> None:
        """Take on parents (at the start, and as the scheduler offers more) and follow each."""
        if self._wake is None:
            return
        for c in candidates:
            p = Parent(
                c.id,
                c.host.ip,
                c.host.port,
                c.host.id,
                weight=parent_weight(c.host.network.max_tx_bandwidth, c.host.network.tx_bandwidth),
                is_seed=c.host.type != HostType.NORMAL.value,
            )
            if not self.planner.add(p):
                continue
            self._syncs[p.peer_id] = asyncio.get_running_loop().create_task(self._sync(p, self.poke))
            self.log.info("parent: {} (weight {:.3g})", p.peer_id, p.weight)
        self._wake.set()

    async def run(self, candidates: list[common_pb2.Peer], shares: list[int]) -> None:
        """One round: fetch from ``candidates`` while the pieces in ``shares`` are read from the source."""
        self.planner.new_round()
        self._syncs = {}
        self._wake = asyncio.Event()
        try:
            self.add(candidates)
            self.download.take_shares(shares)
            if not self.planner.parents and not self.download.sharing():
                raise Reschedule("every candidate parent is blocklisted")
            await self._loop()
        finally:
            self._wake = None
            for t in self._syncs.values():
                t.cancel()
            await asyncio.gather(*self._syncs.values(), return_exceptions=True)

    async def stat_length(self, candidates: list[common_pb2.Peer]) -> int:
        """The content length as a parent holds it (it may still be statting the source)."""
        deadline = time.monotonic() + self.cfg.schedule_timeout
        while True:
            for c in candidates:
                stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(self.ctx.upload_channel(f"{c.host.ip}:{c.host.port}"))
                try:
                    task = await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=self._task_id), timeout=5)
                    return task.content_length
                except grpc.aio.AioRpcError:
                    continue
            if time.monotonic() > deadline:
                raise Reschedule("no parent could say how long the task is")
            await asyncio.sleep(0.1)  # a parent that is statting the source will know soon

    async def _sync(self, parent: Parent, poke: Callable[[], None]) -> None:
        """Follow a parent's SyncPieces stream: which of our missing pieces it has, as they land."""
        interested = sorted(self.download.missing())
        try:
            channel = self.ctx.upload_channel(f"{parent.ip}:{parent.upload_port}")
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
            call = stub.SyncPieces(
                dfdaemon_pb2.SyncPiecesRequest(
                    host_id=self.ctx.host_id, task_id=self._task_id, interested_piece_numbers=interested
                )
            )
            announced = transports_from_metadata(await call.initial_metadata())
            held = self.held.setdefault(parent.host_id, set()) if parent.host_id else set()
            async for resp in call:
                parent.piece_addresses = announced or addresses_from_response(resp)
                self.planner.reported(parent, resp.number, time.monotonic())
                held.add(resp.number)
                poke()
            parent.synced = True
        except grpc.aio.AioRpcError as exc:
            self.log.info("parent {} stopped answering SyncPieces: {}", parent.peer_id, exc.details())
            self.planner.failed(parent)
        finally:
            poke()

    async def _loop(self) -> None:
        """Carry out the planner's decisions until no piece is missing; Reschedule when these parents cannot."""
        download, planner, cfg = self.download, self.planner, self.cfg
        wake = self._wake
        assert wake is not None
        inflight: dict[asyncio.Task[Staged | None], Fetch] = {}
        try:
            while True:
                if download.share_error is not None:
                    raise download.share_error
                missing = download.missing()
                if not missing:
                    return
                sharing = download.sharing()
                plan = planner.plan(missing, time.monotonic(), sharing=sharing, source_instead=download.source_instead)
                for fetch in plan.starts:
                    parent = planner.parents[fetch.parent_id]
                    piece = self._piece(parent, fetch, staged=fetch.staged)
                    inflight[asyncio.get_running_loop().create_task(piece)] = fetch
                    if fetch.staged:
                        self.ctx.metrics.endgame_fetches.inc()
                if plan.give_up is not None:
                    self.runtime.note("reschedule", detail=plan.give_up)
                    raise Reschedule(plan.give_up)
                # Bytes moving into any piece are progress, however slowly they come (a busy parent
                # shares its link), and so is a share of the source being read.
                now = time.monotonic()
                moved = max((m.last for m in self._moving.values() if m.wrote), default=None)
                if sharing:
                    planner.progressed(now)
                elif moved is not None and (planner.progress_at is None or moved > planner.progress_at):
                    planner.progressed(moved)
                stall = planner.stall(now, missing)
                if stall is not Stall.NONE:
                    why = planner.stall_reason(missing, now)
                    self.runtime.note("stall", detail=why)
                    self.log.warning("download stalled: {}", why)
                    if stall is Stall.FAIL:
                        raise PeerError(f"download stalled, other parents did not help: {why}")
                    raise Reschedule(why)
                waiters: set[asyncio.Future[Any]] = set(inflight)
                waiter = None
                # a new piece at a parent, or a parent gone, matters only with a free slot; a share
                # read ending frees the slots it held back
                if not plan.full or (cfg.share_concurrent_pieces and sharing):
                    waiter = asyncio.ensure_future(wake.wait())
                    waiters.add(waiter)
                done, _ = await asyncio.wait(waiters, timeout=plan.wait, return_when=asyncio.FIRST_COMPLETED)
                wake.clear()  # nothing ran since the wait returned: the next pass sees every change
                if waiter is not None:
                    waiter.cancel()
                for t in [t for t in done if t in inflight]:
                    fetch = inflight.pop(t)
                    outcome = outcome_of(t)
                    planner.ended(fetch, outcome, time.monotonic())
                    if outcome is Outcome.STORED:
                        planner.progressed(time.monotonic())
                        # the other fetches of this piece lose: stopped (their writers aborted) before
                        # a staged winner's bytes go into the task
                        losers = [other for other, f in inflight.items() if f.number == fetch.number]
                        for other in losers:
                            other.cancel()
                        if losers:
                            await asyncio.gather(*losers, return_exceptions=True)
                        staged = t.result()
                        if staged is not None:
                            await self._land(staged)
                    elif outcome is Outcome.FAILED:
                        exc = t.exception()
                        assert exc is not None
                        if isinstance(exc, StorageError) or not isinstance(
                            exc, DamselflyError | TimeoutError | OSError
                        ):
                            raise exc  # a full disk is not the parent's fault: stop with that error
        finally:
            for t in inflight:
                t.cancel()
            for result in await asyncio.gather(*inflight, return_exceptions=True):
                if isinstance(result, Staged):
                    result.writer.abort()  # a copy that finished as the download ended: dropped

    async def _land(self, staged: Staged) -> None:
        """An endgame copy won: its verified bytes go into the task through an ordinary writer."""
        try:
            if staged.writer.span.number in self._task.pieces:
                return  # stored meanwhile (another download of this task here)
            writer = self.ctx.storage.writer(self._task_id, staged.writer.span)
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
        self.ctx.metrics.transport_traffic.labels(staged.transport).inc(record.length)
        await self.download.stored(record, TRAFFIC_PEER, staged.parent_id, staged.cost)

    async def _piece(self, parent: Parent, fetch: Fetch, *, staged: bool = False) -> Staged | None:
        """Fetch ``number`` from ``parent`` and store it; a ``staged`` (endgame) copy is verified
        but left for the fetch loop to ``_land`` once the other fetches of the piece stopped.

        The piece is hashed as it is written and committed only if its strong digest is the
        source reader's (the scheduler's answer, else StatTask); its crc32 must match the
        Vortex header too. A mismatch is the parent's lie: it is blocklisted."""
        download, planner, cfg = self.download, self.planner, self.cfg
        number = fetch.number
        span = self._task.layout.span(number)
        pool = self.ctx.pool
        key = ""
        started = time.monotonic()
        known = self.authority.known.get(number)
        # hashed with the source reader's algorithm where known (it may be a seed configured otherwise)
        own = self.ctx.piece_digest
        algorithm = algorithm_of(known) if known else own
        if algorithm not in (*STRONG_ALGORITHMS, WEAK_ALGORITHM):
            algorithm = own  # an unknown digest cannot match: the check below refuses the piece
        inner: PieceWriter = (
            StagedPieceWriter(span, cfg.data_dir) if staged else self.ctx.storage.writer(self._task_id, span)
        )
        moving = self._moving[fetch] = _Moving(inner, started)
        writer = download.writer(moving, number, algorithm, in_order=not staged)
        conn: PieceConnection | None = None
        self.runtime.note("requested", number, parent.peer_id, "endgame copy" if staged else "")
        try:
            key, conn = await pool.acquire(parent.piece_addresses)
            meta = await self._watched(conn.fetch(self._task_id, number, writer), moving, started)
            if meta.offset != span.offset or meta.length != span.length:
                raise ProtocolError(
                    f"parent's piece {number} lies at {meta.offset}+{meta.length}, expected {span.offset}+{span.length}"
                )
            expected = known or await self.authority.digest(number)
            if expected is None and not (parent.is_seed or download.content_named):
                if download.scheduler_lost and download.may_read_source and number not in download.source_instead:
                    # no scheduler will ever name this piece's digest: the source is the one
                    # place left to take it from (a seed whose scheduler died mid-task, say)
                    download.source_instead.add(number)
                    download.take_shares([number])
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
        except Stalled as exc:
            writer.abort()  # the planner asks another holder; this connection is mid-piece: closed
            if conn is not None:
                await conn.close()
            self._parent_failed(parent, number, f"stalled: {exc}", block=False, kind="stalled")
            raise
        except Declined as exc:
            writer.abort()  # a peer has it: ask another, or this one again later; not its failure
            planner.declined(parent, number, time.monotonic())
            self.runtime.note("failed", number, parent.peer_id, f"declined: {exc}")
            raise
        except Busy:
            writer.abort()
            planner.busy(parent, time.monotonic())
            self.runtime.note("failed", number, parent.peer_id, "busy")
            raise
        except NotFound as exc:
            writer.abort()
            planner.lacks(parent, number)
            self._parent_failed(parent, number, str(exc), block=False)
            raise
        except (PeerError, TimeoutError, OSError) as exc:
            writer.abort()
            planner.failed(parent)
            if key:
                await pool.drop(key)
            self._parent_failed(parent, number, f"parent failed: {exc or 'timeout'}", block=False)
            raise
        except BaseException:  # a cancelled fetch leaves its connection broken where that matters (tcp)
            writer.abort()
            raise
        finally:
            self._moving.pop(fetch, None)
            if conn is not None:
                await pool.release(key, conn)
        if isinstance(inner, StagedPieceWriter):
            return Staged(inner, parent.peer_id, key.partition("|")[0], time.monotonic() - started)
        self.ctx.metrics.transport_traffic.labels(key.partition("|")[0]).inc(record.length)
        await download.stored(record, TRAFFIC_PEER, parent.peer_id, time.monotonic() - started, writer)
        return None

    async def _watched(
        self, fetching: Awaitable[vortex.PieceMetadata], moving: _Moving, started: float
    ) -> vortex.PieceMetadata:
        """``fetching``'s result; Stalled once it moved no bytes for stall_timeout, TimeoutError
        once it took piece_timeout (either way it is cancelled)."""
        cfg = self.cfg
        task = asyncio.ensure_future(fetching)
        try:
            while True:
                now = time.monotonic()
                if fetch_stalled(moving.last, now, cfg.stall_timeout):
                    raise Stalled(f"no bytes for {now - moving.last:.1f}s of a piece request")
                if now - started >= cfg.piece_timeout:
                    raise TimeoutError(f"the piece took over {cfg.piece_timeout:.0f}s")
                wait = min(moving.last + cfg.stall_timeout, started + cfg.piece_timeout) - now
                done, _ = await asyncio.wait({task}, timeout=max(wait, 0.0))
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _unverified_parent(self, parent: Parent) -> None:
        if parent.peer_id not in self._unattested:
            self._unattested.add(parent.peer_id)
            self.log.warning(
                "no scheduler has the source's piece digests: taking {} {}'s pieces on crc32{}",
                "seed" if parent.is_seed else "parent",
                parent.peer_id,
                "" if parent.is_seed else ", the whole content checked against its digest",
            )

    def _parent_failed(self, parent: Parent, number: int, reason: str, *, block: bool, kind: str = "failed") -> None:
        self.log.warning("piece {} from parent {}: {}", number, parent.peer_id, reason)
        self.runtime.note(kind, number, parent.peer_id, reason)
        self.ctx.metrics.piece_failures.labels("corrupt" if block else "parent").inc()
        self.ctx.plugins.piece_failed(self._task_id, number, parent.peer_id, reason)
        if block:
            self.planner.block(parent.peer_id)
        self.download.report(
            download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
                piece_number=number, parent_id=parent.peer_id, temporary=not block
            )
        )
