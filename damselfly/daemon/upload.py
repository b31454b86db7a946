"""``dfdaemon.v2.DfdaemonUpload``: what other daemons and the scheduler ask of this one.

Other hosts see only what may be shared (never a copy of this node's own files, never a
task's request headers), and pieces go out through a bounded number of upload slots.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import empty_pb2
from loguru import logger

from damselfly.contracts import ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import Busy, DamselflyError, InvalidArgument, NotFound
from damselfly.core.ids import is_task_id
from damselfly.core.task import Task
from damselfly.daemon.replies import abort_with, progress_stream
from damselfly.daemon.request import DownloadRequest
from damselfly.rpc.wire import host_to_proto, redact_url, task_to_proto, transports_to_metadata
from damselfly.security import tls
from damselfly.security.admission import Origin, reads_this_node
from damselfly.security.identity import identity_of

if TYPE_CHECKING:
    from damselfly.contracts import Storage
    from damselfly.core.host import Host
    from damselfly.daemon.context import DeleteTask, StartDownload, TaskUse
    from damselfly.daemon.offers import Offers
    from damselfly.daemon.runtime import TaskBoard
    from damselfly.telemetry.metrics import DaemonMetrics

TASK_APPEAR_WAIT = 10.0  # seconds SyncPieces waits for a task this daemon is about to start


@dataclass(frozen=True)
class UploadContext:
    """What the upload side needs of the daemon: its stored and running tasks, its upload slots
    and super-seeding offers, and the few calls the upload API makes on it."""

    host_id: str
    ip: str  # host.ip: where SyncPieces tells children to fetch
    storage: Storage
    board: TaskBoard
    metrics: DaemonMetrics
    offers: Offers
    slots: UploadSlots
    slot_limit: int  # daemon.upload_slots
    slot_wait: float  # daemon.upload_wait
    piece_addresses: dict[str, str]  # transport name -> the address children use (filled in at start)
    tls_enabled: bool  # security.tls.enabled: callers are told apart by their certificates
    served: TaskUse
    start_download: StartDownload
    delete_task: DeleteTask
    core_host: Callable[[], Host]


def delete_refusal(context: grpc.aio.ServicerContext, tls_enabled: bool) -> str:
    """Why the caller may not delete this daemon's tasks ('' when it may)."""
    if tls_enabled:
        identity = identity_of(context)
        if identity is not None and identity.roles & {"scheduler", "client"}:
            return ""
        return "DeleteTask needs a certificate with role scheduler or client"
    ip = tls.peer_ip(context.peer())
    if ip and tls.is_loopback(ip):
        return ""
    return f"DeleteTask from {ip or 'another host'} refused: without security.tls only this host may delete tasks"


class UploadService(dfdaemon_pb2_grpc.DfdaemonUploadServicer):
    def __init__(self, ctx: UploadContext):
        self.ctx = ctx

    async def SyncPieces(
        self, request: dfdaemon_pb2.SyncPiecesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dfdaemon_pb2.SyncPiecesResponse]:
        d = self.ctx
        deadline = time.monotonic() + TASK_APPEAR_WAIT
        while (task := shared_task(d.storage, request.task_id)) is None:
            gone = local_task(d.storage, request.task_id) or not d.board.running(request.task_id)
            if gone or time.monotonic() > deadline:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
            try:
                await asyncio.wait_for(d.board.event(request.task_id).wait(), 1.0)
            except TimeoutError:
                pass
        wanted = set(request.interested_piece_numbers) or set(range(task.piece_count))
        sent: set[int] = set()
        announced, skipped = (d.metrics.sync_pieces.labels(o) for o in ("announced", "skipped"))
        ip = d.ip
        tcp_port, quic_port = (_port_of(d.piece_addresses.get(name, "")) for name in ("tcp", "quic"))
        await context.send_initial_metadata(transports_to_metadata(d.piece_addresses))
        seeder = d.offers.seeder(task)
        child = object()  # this stream, as the super-seeder tells children apart
        offered = asyncio.Event()  # a super-seeding seed wakes this stream alone when it offers it a piece
        if seeder is not None:
            seeder.join(child, wanted)
            d.offers.listen(request.task_id, child, offered)
            d.offers.offer(task)
        try:
            while True:
                wait = 1.0
                # decided before what is visible is read: a seeder that opens while this stream is
                # suspended in a yield below gets one more pass, which sends what the opening showed
                last = not d.board.running(request.task_id) and (seeder is None or seeder.open(task.pieces.keys()))
                if seeder is None:
                    changed = d.board.event(request.task_id)
                    visible = task.pieces.keys()
                else:
                    changed = offered
                    offered.clear()
                    visible = seeder.visible(child, task.pieces.keys())
                    deadline = seeder.next_deadline()
                    if deadline is not None:  # an offer may time out and go to one more child
                        wait = min(wait, max(deadline - time.monotonic(), 0.01))
                # A piece the child's host announced to us as our parent, it holds: saying we
                # have it too would only cost both sides a message (in a mesh, most would be such).
                if request.host_id:
                    held = d.board.held_by(request.task_id, request.host_id) & (wanted - sent)
                    sent |= held
                    skipped.inc(len(held))
                for number in sorted((wanted - sent) & visible):
                    rec = task.pieces[number]
                    sent.add(number)
                    announced.inc()
                    yield dfdaemon_pb2.SyncPiecesResponse(
                        number=rec.number,
                        offset=rec.offset,
                        length=rec.length,
                        ip=ip,
                        tcp_port=tcp_port,
                        quic_port=quic_port,
                    )
                if sent >= wanted or d.storage.get(request.task_id) is not task:
                    return
                if last:
                    return  # no more pieces will land here; the child looks elsewhere
                try:
                    async with asyncio.timeout(wait):  # a timer, not a task, per wake: this runs per piece
                        await changed.wait()
                except TimeoutError:
                    if seeder is not None:
                        d.offers.offer(task)  # offers that timed out go to one more child
        finally:
            if seeder is not None:
                seeder.leave(child)
                d.offers.unlisten(request.task_id, child)
                d.offers.offer(task)  # what it was offered goes to another child

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        """The scheduler asks this (seed) daemon to fetch a task, or a cluster member places a
        replica here. A request from the network: the admission point decides which sources
        it may use (never this node's files, never the node's credentials)."""
        try:
            req = DownloadRequest.from_proto(request.download)
            req.output_path = ""
            identity = identity_of(context)
            origin = Origin.SCHEDULER if identity is not None and "scheduler" in identity.roles else Origin.UPLOAD
            rt = await self.ctx.start_download(req, origin=origin, member=identity is not None)
        except DamselflyError as exc:
            await abort_with(context, exc)
            return
        async for resp in progress_stream(self.ctx.host_id, self.ctx.storage, rt, context, with_content=False):
            yield resp

    async def StatTask(
        self, request: dfdaemon_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        task = shared_task(self.ctx.storage, request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return public_task(task)

    async def DeleteTask(
        self, request: dfdaemon_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        """Only the scheduler or an operator deletes a daemon's task: under mutual TLS a
        certificate with role ``scheduler`` or ``client``; without TLS a caller on loopback
        (this host). Another cluster member may not."""
        why = delete_refusal(context, self.ctx.tls_enabled)
        if why:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        await self.ctx.delete_task(request.task_id)
        return empty_pb2.Empty()

    async def SyncHost(
        self, request: dfdaemon_pb2.SyncHostRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.Host]:
        while True:
            yield host_to_proto(self.ctx.core_host())
            await asyncio.sleep(1.0)


def is_local(task: Task) -> bool:
    """``task`` holds one of this node's own files (file://, local://...): never shared."""
    return reads_this_node(urlsplit(task.url).scheme)


def local_task(storage: Storage, task_id: str) -> bool:
    task = storage.get(task_id)
    return task is not None and is_local(task)


def shared_task(storage: Storage, task_id: str) -> Task | None:
    """The stored task ``task_id`` as other hosts may see it: None when there is none, and when
    it is a copy of one of this node's own files (other hosts are told it is not here)."""
    task = storage.get(task_id)
    if task is None or is_local(task):
        return None
    return task


def public_task(task: Task) -> common_pb2.Task:
    """A task as the upload API shows it to other hosts: no request headers (they carry the
    requester's credentials) and no credentials in its url."""
    pb = task_to_proto(task)
    pb.ClearField("request_header")
    pb.url = redact_url(pb.url)
    return pb


async def lookup_piece(ctx: UploadContext, task_id: str, number: int) -> ServedPiece:
    """What the piece server sends for a DownloadPiece request."""
    if not is_task_id(task_id):
        raise InvalidArgument(f"bad task id {task_id!r}")
    task = shared_task(ctx.storage, task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    record = task.pieces.get(number)
    if record is None:
        raise NotFound(f"piece {number} of task {task_id} not found")
    if not await ctx.slots.acquire(ctx.slot_limit, ctx.slot_wait):
        logger.debug("piece {}: busy", number)
        ctx.metrics.upload_busy.inc()
        raise Busy(f"all {ctx.slot_limit} upload slots are taken")
    seeder = ctx.offers.seeder(task)
    if seeder is not None:
        seeder.taken(number)
        if seeder.open(task.pieces.keys()):
            ctx.offers.offer(task)  # every piece went out once: all children may see all now
    logger.debug("piece {}: sending", number)
    ctx.served(task_id)
    meta = vortex.PieceMetadata(
        number=record.number,
        offset=record.offset,
        length=record.length,
        digest=record.digest,
        parent_id=ctx.board.peer_id(task_id),
        traffic_type=vortex.TrafficType.REMOTE_PEER,
        cost_seconds=0,
        created_at=int(time.time()),
    )
    ctx.metrics.upload_traffic.inc(record.length)
    ctx.metrics.upload_pieces.inc()
    ctx.slots.sent_bytes += record.length
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            ctx.slots.release()
            if seeder is not None:
                seeder.done(number)
                ctx.offers.offer(task)  # the child has room for another offer

    try:
        region = ctx.storage.piece_region(task_id, number)
        if region is not None:
            return ServedPiece(meta, region=region, release=release)
        return ServedPiece(meta, data=await ctx.storage.read_piece(task_id, number), release=release)
    except BaseException:
        release()
        raise


class UploadSlots:
    """Pieces being sent to children, at most ``limit`` at once (0: no limit).

    A request that finds them taken may wait up to ``wait`` seconds for one: a slot
    that frees is handed to the oldest waiter, so a child is served a little later
    rather than told "busy" and left to ask around. ``sent_bytes`` counts the bytes of
    the pieces handed out (the upload load the host announces).
    """

    def __init__(self) -> None:
        self.used = 0
        self.sent_bytes = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, limit: int, wait: float) -> bool:
        if not limit or self.used < limit:
            self.used += 1
            return True
        if wait <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), wait)
            return True  # handed a slot by release (counted there)
        except TimeoutError:
            pass
        except BaseException:  # cancelled while waiting: a slot handed over meanwhile goes back
            if fut.done() and not fut.cancelled():
                self.release()
            fut.cancel()
            raise
        if fut.done() and not fut.cancelled():
            return True  # handed over right at the deadline
        fut.cancel()
        return False

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to this waiter
                return
        self.used -= 1


def _port_of(address: str) -> int:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else 0
