"""One AnnouncePeer stream: a peer's requests, each applied as it is read, and its answers.

The session registers its peer (after the admission checks), records what the peer reports
(pieces, its start, its end, a wish to be rescheduled) and has it scheduled; its answers go
to its stream in order, written as they are made (damselfly.rpc's callback form,
``StreamOut``) or queued for grpcio's generator (``Outbox``). The stream's end is the
peer's: a peer whose stream breaks before it said it finished leaves. What the peer
registered with stays here, with its credentials, which the scheduler keeps nowhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc
from dragonfly_api import common_pb2, scheduler_pb2
from loguru import logger

from damselfly.core.peer import Peer, PeerState
from damselfly.core.task import TaskState
from damselfly.rpc import ServicerContext
from damselfly.rpc.wire import has_secrets, public_headers, redact_url, strip_secrets
from damselfly.scheduler import answers
from damselfly.scheduler.access import Access
from damselfly.scheduler.answers import Answer, Encoded, ScheduleError
from damselfly.scheduler.scheduling import Scheduling
from damselfly.scheduler.shares import SourceReads
from damselfly.scheduler.state import TaskEntry

CLOSE = object()  # the stream's end, after the answers before it


class Outbox:
    """The answers waiting to go out on one AnnouncePeer stream: ``asyncio.Queue``'s
    ``put_nowait`` and ``get`` for one reader, at a fraction of its cost."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class StreamOut:
    """The answers of one AnnouncePeer stream served in damselfly.rpc's callback form: each
    written as it is made; the stream's end or error ends the call."""

    __slots__ = ("context",)

    def __init__(self, context: ServicerContext):
        self.context = context

    def put_nowait(self, item: object) -> None:
        if type(item) is Encoded:
            self.context.write_encoded_nowait(item.data)
        elif item is CLOSE:
            self.context.end()
        elif isinstance(item, ScheduleError):
            self.context.end(item.code, str(item))
        else:
            self.context.write_nowait(item)


class PeerSession:
    """One AnnouncePeer stream: the requests of one peer, answered through ``out``."""

    def __init__(
        self,
        scheduling: Scheduling,
        shares: SourceReads,
        access: Access,
        out: Outbox | StreamOut,
        *,
        shares_ok: bool = False,
        context: object = None,
    ):
        self.scheduling = scheduling
        self.shares = shares
        self.access = access
        self.st = scheduling.state
        self.cfg = scheduling.cfg
        self.out = out
        self.shares_ok = shares_ok  # the peer said it may take a share of the source read
        self.context = context  # the call's, for the caller's certificate
        self.peer: Peer | None = None
        # what the peer registered with, as the scheduler keeps it (without credentials)
        self.download: common_pb2.Download | None = None
        # the peer's request as it sent it, while it has credentials the scheduler does not keep:
        # it lives with the stream (the request), for the seed trigger over TLS
        self.request: common_pb2.Download | None = None
        self.scheduling_task: asyncio.Task[None] | None = None
        self.input_done = False  # the requests ended, or one ended the stream

    def close(self) -> None:
        if self.scheduling_task:
            self.scheduling_task.cancel()
        self._stop_refresh()
        p = self.peer
        if p is not None and self.st.peers.get(p.id) is p and not p.done:  # (not one registered again since)
            # The stream broke before the peer said it finished: it is gone.
            entry = self.st.tasks.get(p.task_id)
            if entry is not None:
                self.shares.hand_on(entry, p, "its stream ended", gone=True)
            p.state = PeerState.LEAVE
            self.st.remove_peer(p.id)

    def _schedule_soon(self) -> None:
        """Schedule the peer: at once when a parent or the source can be named now (most
        decisions), in a task that waits for the seed or a parent otherwise."""
        peer = self.peer
        assert peer is not None
        if self.scheduling_task and not self.scheduling_task.done():
            return
        peer.schedule_count += 1
        try:
            answer = self.scheduling.schedule_now(peer, time.monotonic(), self.download, self.request)
        except ScheduleError as exc:
            self.out.put_nowait(exc)
            return
        if answer is None:
            self.scheduling_task = asyncio.get_running_loop().create_task(self._schedule(peer))
        else:
            self._answer(peer, answer)

    async def _schedule(self, peer: Peer) -> None:
        try:
            answer = await self.scheduling.schedule(peer, self.download, self.request)
        except ScheduleError as exc:
            self.out.put_nowait(exc)
            return
        self._answer(peer, answer)

    def _answer(self, peer: Peer, answer: Answer) -> None:
        self.out.put_nowait(answer)
        if type(answer) is Encoded or answer.WhichOneof("response") == "normal_task_response":  # type: ignore[union-attr]
            self._start_refresh(peer)

    def _start_refresh(self, peer: Peer) -> None:
        self.scheduling.start_refresh(self.st.tasks[peer.task_id], peer, self.out)

    def _stop_refresh(self) -> None:
        p = self.peer
        entry = self.st.tasks.get(p.task_id) if p is not None else None
        if p is not None and entry is not None:
            self.scheduling.stop_refresh(entry, p)

    async def consume(self, requests: AsyncIterator[scheduler_pb2.AnnouncePeerRequest]) -> None:
        try:
            async for req in requests:
                self.on_request(req)
                if self.input_done:
                    return
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        self.on_requests_end()

    def on_request(self, req: scheduler_pb2.AnnouncePeerRequest) -> None:
        """Apply one request; the stream's answers, its end or its error go to ``out``."""
        if self.input_done:
            return
        try:
            if self.handle(req):
                self.input_done = True
                self.out.put_nowait(CLOSE)
        except ScheduleError as exc:
            self.input_done = True
            self.out.put_nowait(exc)
        except Exception as exc:  # a bug of ours: the peer hears of it, the scheduler goes on
            logger.opt(exception=exc).error("AnnouncePeer request failed")
            self.input_done = True
            self.out.put_nowait(ScheduleError(grpc.StatusCode.INTERNAL, f"scheduler error: {exc}"))

    def on_requests_end(self) -> None:
        if not self.input_done:
            self.input_done = True
            self.out.put_nowait(CLOSE)

    def handle(self, req: scheduler_pb2.AnnouncePeerRequest) -> bool:
        """Apply one request; True when the stream is over."""
        kind = req.WhichOneof("request")
        now = time.time()
        if kind == "register_peer_request":
            self.register(req, req.register_peer_request.download, now)
            return False
        peer = self.st.peers.get(req.peer_id)
        if peer is None or self.peer is None or peer.id != self.peer.id:
            raise ScheduleError(grpc.StatusCode.NOT_FOUND, f"peer {req.peer_id} is not registered on this stream")
        entry = self.st.tasks[peer.task_id]
        peer.updated_at = now
        # the most frequent request first: a download reports every piece
        if kind in ("download_piece_finished_request", "download_piece_back_to_source_finished_request"):
            piece = getattr(req, kind).piece
            peer.finished_pieces.add(piece.number)
            c = piece.cost
            peer.add_cost(c.seconds + c.nanos / 1e9)
            if kind == "download_piece_back_to_source_finished_request":
                self.scheduling.reports["back_to_source"].inc()
                share = entry.shares.get(peer.id)
                self.shares.piece_read(entry, peer, piece, share)
                if share is not None:
                    share.discard(piece.number)
                    if not share:
                        del entry.shares[peer.id]
            else:
                self.scheduling.reports["remote_peer"].inc()
                parent = self.st.peers.get(piece.parent_id)
                if parent is not None:
                    ph = self.st.hosts.get(parent.host_id)
                    if ph is not None:
                        ph.upload_content_length += piece.length
            entry.task.updated_at = now
            if len(peer.finished_pieces) == 1:
                entry.notify()  # a peer with pieces is a candidate now
        elif kind == "download_peer_started_request":
            if peer.state is PeerState.PENDING:
                peer.state = PeerState.RUNNING
                entry.notify()  # running with a parent: a candidate for the others now
            entry.task.state = TaskState.RUNNING
        elif kind == "download_peer_back_to_source_started_request":
            peer.state = PeerState.BACK_TO_SOURCE
            entry.back_to_source_peers.add(peer.id)
            entry.task.state = TaskState.RUNNING
            entry.notify()
        elif kind == "download_piece_failed_request":
            r = req.download_piece_failed_request
            if r.parent_id:
                peer.blocklist.add(r.parent_id)
        elif kind == "download_piece_back_to_source_failed_request":
            logger.warning("peer {} failed a piece from the source", peer.id)
            self.shares.hand_on(entry, peer, "it could not read the source")
        elif kind == "reschedule_peer_request":
            r = req.reschedule_peer_request
            for c in r.candidate_parents:
                peer.blocklist.add(c.id)
                peer.parents.discard(c.id)
            logger.info("peer {} asks to be rescheduled: {}", peer.id, r.description)
            self._stop_refresh()
            if peer.schedule_count > self.scheduling.settings.daemon.schedule_retries + 1:
                self.out.put_nowait(self.scheduling.back_to_source(entry, peer, "max schedule count exceeded"))
            else:
                self._schedule_soon()
        elif kind in ("download_peer_finished_request", "download_peer_back_to_source_finished_request"):
            self.shares.hand_on(entry, peer, "it finished")  # nothing is left of a share by then
            peer.state = PeerState.SUCCEEDED
            if self.st.range_of(peer.id) is None:
                entry.task.state = TaskState.SUCCEEDED  # a ranged peer finishing says nothing of the rest
            entry.notify()
            return True
        elif kind in ("download_peer_failed_request", "download_peer_back_to_source_failed_request"):
            self.shares.hand_on(entry, peer, "it failed")
            peer.state = PeerState.FAILED
            host = self.st.hosts.get(peer.host_id)
            if kind == "download_peer_back_to_source_failed_request" and host is not None and host.is_seed:
                entry.seed_failed_at = now
            entry.notify()
            self.st.remove_peer(peer.id)
            return True
        else:
            raise ScheduleError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported request {kind}")
        return False

    def register(self, req: scheduler_pb2.AnnouncePeerRequest, download: common_pb2.Download, now: float) -> None:
        if self.peer is not None:
            raise ScheduleError(grpc.StatusCode.FAILED_PRECONDITION, "peer already registered on this stream")
        host = self.st.hosts.get(req.host_id)
        if host is None:
            raise ScheduleError(grpc.StatusCode.NOT_FOUND, f"host {req.host_id} has not been announced")
        if not req.task_id or not req.peer_id:
            raise ScheduleError(grpc.StatusCode.INVALID_ARGUMENT, "task_id and peer_id are required")
        from damselfly.security.admission import reads_this_node

        scheme = download.url.partition(":")[0] if ":" in download.url else ""
        if scheme and reads_this_node(scheme):  # a host's own file is never shared through the swarm
            raise ScheduleError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{scheme.lower()}:// tasks are a host's own files, never scheduled"
            )
        access = self.access
        if access.tls:
            access.check_owner(access.identity(self.context), host.id, "AnnouncePeer")
        access.check_task_id(req.task_id, download)
        access.check_room(tasks=req.task_id, peers=req.peer_id)
        # Credentials stay with the request (this stream): the scheduler keeps and shows the
        # request without them, stripped once here.
        if has_secrets(download):
            self.request = download
            download = strip_secrets(download)
        self.download = download
        entry = self.st.entry(req.task_id)
        task = entry.task
        if not task.url:
            task.url, task.tag, task.application = redact_url(download.url), download.tag, download.application
            task.filtered_query_params = list(download.filtered_query_params)
            task.request_header = public_headers(download.request_header)
            task.digest = download.digest
        if download.actual_piece_length and not task.known_length:
            task.content_length = download.actual_content_length
            task.piece_length = download.actual_piece_length
            entry.notify()
        old = self.st.peers.get(req.peer_id)
        if old is not None:
            self.st.remove_peer(old.id)
        peer = Peer(
            id=req.peer_id,
            task_id=req.task_id,
            host_id=host.id,
            need_back_to_source=download.need_back_to_source,
            created_at=now,
            updated_at=now,
            priority=download.priority,
            metadata_only=download.metadata_only,
        )
        self.st.peers[peer.id] = peer
        self.st.set_range(peer.id, (download.range.start, download.range.length))
        host.peer_ids.add(peer.id)
        task.peer_ids.add(peer.id)
        self.peer = peer
        if (
            self.shares_ok
            and self.cfg.source_shares
            and not self.st.strategy.dag  # in a DAG no piece flows up to a parent: a block would reach few
            and self.st.range_of(peer.id) is None
            and not download.disable_back_to_source
            and not download.metadata_only
        ):
            entry.sharers[peer.id] = self.out
        if download.metadata_only:
            # A daemon that already holds the whole task says so (after a restart, say).
            peer.state = PeerState.RUNNING
            self.out.put_nowait(answers.metadata_only())
            return
        if download.need_back_to_source and self.scheduling.may_read_source(entry, peer, host):
            if host.is_seed and peer.id in entry.sharers and not entry.shares_planned:
                self.scheduling_task = asyncio.get_running_loop().create_task(self._share_or_read(entry, peer))
                return
            self.out.put_nowait(self.scheduling.back_to_source(entry, peer, "the peer asked for it"))
            return
        self._schedule_soon()

    async def _share_or_read(self, entry: TaskEntry, seed: Peer) -> None:
        """The seed of a new task: after ``source_share_wait`` (the peers that started the task
        with the first one register meanwhile), a block to read and the rest from the peers, or
        the whole task from the source when there is nobody to share with."""
        await asyncio.sleep(self.cfg.source_share_wait)
        if seed.id not in self.st.peers or seed.done:
            return
        if entry.task.known_length and entry.task.piece_count and not self.shares.unheld(entry):
            # every piece is held by a peer already: the seed fetches them like any peer
            entry.shares_planned = True
            seed.need_back_to_source = False
            self._schedule_soon()
            return
        shared = self.shares.plan(entry, seed)
        if shared is None:
            self.out.put_nowait(self.scheduling.back_to_source(entry, seed, "the peer asked for it"))
            return
        self.out.put_nowait(shared)
        self._start_refresh(seed)
