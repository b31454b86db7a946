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

``Downloader`` holds the conversation with the scheduler, the task's layout, the source
reads and where each verified piece goes; it sees the daemon through a
``DownloadContext``. The fetch from parents is ``parents.ParentFetch``, whose choices
of piece and parent are ``planner.Planner``'s.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from dragonfly_api import common_pb2, errordetails_pb2, scheduler_pb2
from loguru import logger

from damselfly.contracts import INLINE_WRITE_LIMIT, DigestingWriter, PieceWriter, Source, SourceInfo, strong_of
from damselfly.core import vortex
from damselfly.core.errors import (
    BackendError,
    DamselflyError,
    InvalidArgument,
    PeerError,
    PieceCorrupt,
    StorageError,
)
from damselfly.core.piece import WEAK_ALGORITHM, Layout
from damselfly.core.task import PieceRecord, Task, TaskState
from damselfly.daemon.content import ContentCheck, check_stored
from damselfly.daemon.origin import OriginCalls
from damselfly.daemon.parents import ParentFetch, Reschedule
from damselfly.daemon.planner import Planner, source_runs
from damselfly.daemon.request import CACHE_EXPIRES_HEADER, named_digest
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started, TaskRuntime
from damselfly.daemon.schedlink import PieceAuthority, SchedulerLink
from damselfly.rpc.wire import SOURCE_SHARES_METADATA, piece_to_proto, source_share_from_proto
from damselfly.security.admission import reads_this_node

if TYPE_CHECKING:
    from damselfly.daemon.download_context import DownloadContext
    from damselfly.daemon.request import DownloadRequest

TRAFFIC_SOURCE = vortex.TrafficType.BACK_TO_SOURCE
TRAFFIC_PEER = vortex.TrafficType.REMOTE_PEER


class _SchedulerGone(Exception):
    """The announce stream broke before any download from parents began: try the next scheduler."""


class Downloader:
    """Runs one task's download on behalf of the daemon; publishes progress on the runtime."""

    def __init__(self, ctx: DownloadContext, req: DownloadRequest, runtime: TaskRuntime):
        self.ctx = ctx
        self.req = req
        self.rt = runtime
        self.task_id = runtime.task_id
        self.peer_id = ctx.new_peer_id()
        runtime.peer_id = self.peer_id
        self.log = logger.bind(task_id=self.task_id[:12], peer_id=self.peer_id)
        self.task: Task | None = None
        self.source: Source | None = None
        self.origin = OriginCalls(ctx.metrics, ctx.config, req.url, self.log)  # the cap and retries of its reads
        self.link: SchedulerLink | None = None
        self.scheduler = ""  # the address of the scheduler this download announces to
        self.scheduler_lost = False  # it went away while parents carried the download on
        self.peer_bytes = 0
        self.source_bytes = 0
        # the strong digest this daemon computes of what it reads from the source
        self.algorithm = ctx.piece_digest
        # digests the scheduler learnt from the source reader: every piece from a parent is checked
        self.authority = PieceAuthority(self._stat_task)
        self._content: ContentCheck | None = None  # the whole content's digest, checked in order
        self._content_checked = False
        self.source_instead: set[int] = set()  # pieces no parent can attest, read from the source
        self._todo: set[int] | None = None
        self._reader: asyncio.Future[scheduler_pb2.AnnouncePeerResponse | None] | None = None
        self._shares: set[asyncio.Task[None]] = set()  # reads of the pieces the scheduler handed us
        self._early_shares: list[int] = []  # handed before the task was made: read once it is
        self.share_error: BaseException | None = None  # what stops the download (a full disk)
        self.rescheduled = ""  # why its parents last could not finish it (said if it fails)
        # which piece from which parent: its policy, and its state across rounds of parents
        self.planner = Planner(ctx.config, ctx.picker)
        self.parents = ParentFetch(self, self.task_id, ctx, self.planner, self.authority, runtime, self.log)
        if self.algorithm == WEAK_ALGORITHM:
            _warn_weak_digest()

    @property
    def may_read_source(self) -> bool:
        return not (self.req.disable_back_to_source or self.ctx.config.disable_back_to_source)

    # -- entry -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
            assert self.task is not None
            await self._finish()
            self.rt.publish(Finished())
            self.ctx.plugins.task_finished(
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
            self.ctx.metrics.download_task_failure.labels("standard").inc()
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
        self.ctx.metrics.download_task.labels("standard").inc()
        existing = self.ctx.storage.get(self.task_id)
        if existing is not None and existing.known_length:
            self.task = existing
            self._started()
            needed = self._needed()
            for rec in sorted(existing.pieces.values(), key=lambda p: p.number):
                if rec.number in needed:
                    self.rt.publish(PieceEvent(rec, vortex.TrafficType.LOCAL_PEER, "", 0.0))
            if not self.missing():
                return
        if self._reads_this_node():
            # one of this node's own files: read here, never announced, so no peer is handed it
            # (nor asks this node for it) and no peer's copy stands in for it
            if not self.may_read_source:
                raise PeerError(
                    f"{self.req.url.split(':', 1)[0]}:// is read from this node's own files, never from peers, "
                    "and back-to-source is disabled"
                )
            await self._from_source(report=False, reason="local_file")
            return
        if not self.ctx.schedulers.addresses:
            if not self.may_read_source:
                raise PeerError("no scheduler is configured and back-to-source is disabled")
            self.log.info("no scheduler configured: fetching {} from the source", self.req.url)
            await self._from_source(report=False, reason="no_scheduler")
            return
        for _ in self.ctx.schedulers.addresses:
            link = await self._open_link()
            if link is None:
                break
            self.link = link
            try:
                await self._with_scheduler(link)
            except _SchedulerGone as gone:
                self.ctx.scheduler_lost(self.scheduler)
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
                self.ctx.spawn(self.ctx.announce_finished(self.task))
            return
        await self._source_without_scheduler(f"no scheduler answered for {self.req.url}", "scheduler_unreachable")

    def _reads_this_node(self) -> bool:
        """The url's source reads this node's own files (file://, local://...)."""
        return reads_this_node(urlsplit(self.req.url).scheme)

    # -- the scheduler ------------------------------------------------------------------

    async def _open_link(self) -> SchedulerLink | None:
        picked = await self.ctx.schedulers.pick(self.task_id)
        if picked is None:
            return None
        self.scheduler, stub = picked
        # a daemon that may read the source offers to take a share of a new task's source read
        offer = self.may_read_source and self.req.range is None
        call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA if offer else None)
        link = SchedulerLink(call, self.ctx.host_id, self.task_id, self.peer_id)
        if self.ctx.is_seed and self.req.need_back_to_source:
            await self._prepare_from_source()  # a seed stats the origin before it registers
        # the request's one conversion on its way out: with the task's layout where it is known
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
                        self.rescheduled = str(why)
                        if not link_alive:
                            await self._source_without_scheduler(f"parents cannot finish ({why})", "parents_failed")
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
                        self.ctx.scheduler_lost(self.scheduler)
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
                        self.take_shares(shares)
                        self.parents.add(candidates)
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

    async def _source_without_scheduler(self, why: str, reason: str) -> None:
        if not self.may_read_source:
            raise PeerError(f"{why}, and back-to-source is disabled")
        self.log.warning("{}: finishing from the source", why)
        await self._from_source(report=False, reason=reason)

    async def _back_to_source(self, link: SchedulerLink, why: str) -> None:
        if not self.may_read_source:
            after = f" (parents: {self.rescheduled})" if self.rescheduled else ""
            raise PeerError(f"scheduler sent this peer to the source, and back-to-source is disabled{after}")
        await asyncio.gather(*self._shares, return_exceptions=True)  # what they read is not read again
        link.send(download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest())
        try:
            await self._from_source(report=True, reason="scheduler", why=why)
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
        task_id, storage = self.task_id, self.ctx.storage
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
            await self.ctx.storage.delete(self.task_id)
            raise
        self._content_checked = True

    async def _stat_task(self) -> common_pb2.Task | None:
        """The task as the scheduler has it, with its pieces' source digests; None when its
        scheduler is gone (another does not know the task) or does not answer."""
        if self.scheduler_lost:
            return None
        stub = await self.ctx.schedulers.stub_for(self.task_id)
        if stub is None:
            return None
        try:
            return await stub.StatTask(
                scheduler_pb2.StatTaskRequest(host_id=self.ctx.host_id, task_id=self.task_id), timeout=5
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
        self.task = await self.ctx.storage.create(task)
        self.ctx.metrics.tasks.set(len(self.ctx.storage.tasks()))
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

    def missing(self) -> set[int]:
        """Numbers of the needed pieces not stored yet (kept up to date as pieces land)."""
        assert self.task is not None
        if self._todo is None:
            self._todo = set(self._needed())
        self._todo.difference_update(self.task.pieces.keys())  # another download here may have stored some
        return self._todo

    def writer(self, inner: PieceWriter, number: int, algorithm: str, *, in_order: bool = True) -> DigestingWriter:
        """``inner`` hashed as it is written: the piece's strong digest, and the whole content's
        digests where this piece is the next one in order."""
        also = self._content.continuation(number) if self._content is not None and in_order else None
        return DigestingWriter(inner, algorithm, number, also)

    async def stored(
        self, record: PieceRecord, traffic: int, parent_id: str, cost: float, writer: DigestingWriter | None = None
    ) -> None:
        """A verified piece is stored: tell the hooks, the scheduler and whoever waits on it."""
        self.missing().discard(record.number)
        self.rt.note("stored", record.number, parent_id or "source", "", record.length, cost)
        self.ctx.plugins.piece_verified(self.task_id, record.number, record.length, parent_id, int(traffic))
        self.ctx.metrics.download_traffic.labels("back_to_source" if traffic == TRAFFIC_SOURCE else "remote_peer").inc(
            record.length
        )
        self.ctx.metrics.piece_seconds.observe(cost)
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
        self.parents.poke()
        self.ctx.offer_pieces(self.task)  # a super-seeding seed tells one child of the new piece

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
            await self.ctx.storage.finish(self.task_id)
        elif self.req.digest and self.req.range is None and not self._content_checked:
            await check_stored(self.ctx.storage, self.task, self.req.digest)  # complete before this download: read it

    # -- back to source -------------------------------------------------------------------------

    async def _prepare_from_source(self) -> None:
        if self.task is not None and self.task.known_length:
            return
        source = self.source = self.ctx.plugins.make_source(self.req.url, self.req.source_options)

        async def stat() -> SourceInfo:
            async with self.origin.slot():
                return await source.stat(self.req.url, self.req.request_header)

        info = await self.origin.retrying(stat)
        if info.content_length < 0:
            raise BackendError(f"origin gives no content length for {self.req.url}")
        await self._create(info.content_length, info.headers)

    def _going_to_source(self, reason: str, why: str = "") -> None:
        """Every read of the origin is logged and counted with its reason."""
        self.ctx.metrics.back_to_source.labels(reason).inc()
        self.log.info("back to source ({}){}", reason, f": {why}" if why else "")
        self.rt.note("back_to_source", detail=f"{reason}: {why}" if why else reason)

    async def _from_source(self, *, report: bool, reason: str, why: str = "") -> None:
        self._going_to_source(reason, why)
        await self._prepare_from_source()
        if self.source is None:
            self.source = self.ctx.plugins.make_source(self.req.url, self.req.source_options)
        if not report:
            self.link = None
        await self._read_source(sorted(self.missing()))

    async def _read_source(self, missing: list[int]) -> None:
        """Read pieces ``missing`` (sorted) from the source, storing and reporting each once whole."""
        assert self.task is not None
        cfg = self.ctx.config
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
        """Read consecutive pieces ``numbers`` from the source in one request, storing each once
        whole; after a transient failure, the pieces not stored yet in another request."""

        async def attempt() -> None:
            missing = self.missing()
            first = next((k for k, n in enumerate(numbers) if n in missing), len(numbers))
            if first < len(numbers):
                async with self.origin.slot():
                    await self._source_pass(numbers[first:])

        await self.origin.retrying(attempt)

    async def _source_pass(self, numbers: list[int]) -> None:
        """One request for consecutive pieces ``numbers``."""
        assert self.source is not None
        assert self.task is not None
        spans = [self.task.layout.span(n) for n in numbers]
        start, end = spans[0].offset, spans[-1].end
        started = time.monotonic()
        storage = self.ctx.storage
        i, pos = 0, start
        # the strong digest is computed in the same pass as the write and the crc32
        writer = self.writer(storage.writer(self.task_id, spans[0]), spans[0].number, self.algorithm)
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
                        await self.stored(record, TRAFFIC_SOURCE, "", now - started, writer)
                        started, i = now, i + 1
                        if i < len(spans):
                            writer = self.writer(
                                storage.writer(self.task_id, spans[i]), spans[i].number, self.algorithm
                            )
            if i < len(spans):
                raise BackendError(f"the source ended {end - pos} bytes short of {self.req.url}")
        except BaseException:
            writer.abort()
            raise

    # -- from parents ------------------------------------------------------------------------------

    def sharing(self) -> bool:
        return any(not t.done() for t in self._shares)

    def take_shares(self, numbers: list[int]) -> None:
        """Read the pieces the scheduler handed this peer from the source, beside the fetches."""
        if self.task is None:  # a later answer came before the first one's fetch made the task
            self._early_shares += numbers
            return
        wanted = sorted(n for n in set(numbers) if n in self.missing())
        if not wanted:
            return
        if not self.may_read_source:  # the scheduler should not have: let it hand them on
            self._share_failed(wanted, BackendError("back-to-source is disabled on this daemon"))
            return
        self._going_to_source("share", f"{len(wanted)} pieces, a share of the task's one read")
        t = asyncio.get_running_loop().create_task(self._read_share(wanted))
        self._shares.add(t)
        t.add_done_callback(lambda _: self.parents.poke())

    async def _read_share(self, numbers: list[int]) -> None:
        try:
            if self.source is None:
                self.source = self.ctx.plugins.make_source(self.req.url, self.req.source_options)
            await self._read_source(numbers)
        except StorageError as exc:  # a full disk is this download's end, not the source's fault
            self.share_error = exc
        except (DamselflyError, OSError, TimeoutError) as exc:
            self._share_failed([n for n in numbers if n in self.missing()], exc)

    def _share_failed(self, numbers: list[int], exc: BaseException) -> None:
        """Tell the scheduler; it hands the rest of the share on, and the pieces come from a parent."""
        self.log.warning("source share failed ({} pieces left): {}", len(numbers), exc)
        self.source_instead.difference_update(numbers)  # parents may serve them after all
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
        if not candidates and not shares and not self.sharing():
            raise Reschedule("no candidate parents")
        self.authority.learn(task_pb.pieces)
        if self.task is None:
            if task_pb.content_length or task_pb.piece_count:
                await self._create(task_pb.content_length, None)
            else:  # the scheduler has not learnt the length: ask the parents themselves
                await self._create(await self.parents.stat_length(candidates), None)
        shares, self._early_shares = [*shares, *self._early_shares], []
        await self.parents.run(candidates, shares)

    @property
    def content_named(self) -> bool:
        """The whole content is checked, before the task completes, against the digest its url names."""
        return self._content is not None and named_digest(self.req.url) is not None

    def report(self, **message: Any) -> None:
        """Send an AnnouncePeerRequest field to the scheduler, when this download reports to one."""
        if self.link is not None:
            self.link.send(**message)


@functools.cache
def _warn_weak_digest() -> None:
    """Once per process: the piece digest is crc32."""
    logger.warning("security.piece_digest is crc32, upstream's weak mode: a parent can forge a piece that passes it")


async def _gather_or_cancel(coros: list[Coroutine[Any, Any, None]]) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
