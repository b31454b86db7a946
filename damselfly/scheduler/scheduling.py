"""Scheduling: for each peer, parents or the source, and more parents as they appear.

A decision names the parents the strategy ranked first (``SchedulerState.candidates``), or
sends the peer to the source when nobody can serve it and nobody is reading the source for
it; otherwise the task's seed is asked to fetch it from the origin (so that the origin is
read once) and the peer waits. Every path to the source, a peer's own ``need_back_to_source``
included (``may_read_source``), stays within the task's ``back_to_source_limit`` and the
origin's ``origin_reads`` (readers of one ``scheme://host:port`` at once, across tasks);
only a seed host is never held back. A downloading peer is offered more parents at every change of
its task, and every REFRESH_INTERVAL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from loguru import logger

from damselfly.config import Settings
from damselfly.contracts import Candidate
from damselfly.core.host import Host
from damselfly.core.peer import Peer, PeerState
from damselfly.core.piece import ByteRange, covers
from damselfly.scheduler import answers
from damselfly.scheduler.answers import Answer, Answers, Encoded, ScheduleError
from damselfly.scheduler.preheat import channel_to
from damselfly.scheduler.state import AnswerSink, SchedulerState, TaskEntry
from damselfly.security.admission import derived_task_key
from damselfly.telemetry.metrics import SchedulerMetrics

SEED_FAILED_WINDOW = 1800.0  # seconds a seed that failed a task is not asked for it again (upstream's)
REFRESH_INTERVAL = 2.0  # seconds: the longest a downloading peer waits for another look at its parents
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Scheduling:
    """The decisions on the scheduler's state, and the answers that say them."""

    def __init__(self, settings: Settings, state: SchedulerState, answers: Answers, metrics: SchedulerMetrics):
        self.settings = settings
        self.cfg = settings.scheduler
        self.state = state
        self.answers = answers
        self.metrics = metrics
        self.tls = settings.security.tls.enabled  # the seed gets a request's credentials only over TLS
        # the label children counted on every decision and piece report, looked up once
        self.schedules = {k: metrics.schedule.labels(k) for k in ("empty", "normal", "refresh", "back_to_source")}
        self.reports = {k: metrics.piece_reports.labels(k) for k in ("back_to_source", "remote_peer")}
        self.background: set[asyncio.Task[None]] = set()
        self._refresh_due: dict[str, TaskEntry] = {}  # tasks changed in this turn of the loop
        self._origin_readers: dict[str, set[str]] = {}  # scheme://host:port -> peers sent to read it
        state.on_task_change = self._refresh_soon

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, until it ends or the scheduler stops."""
        t = asyncio.get_running_loop().create_task(coro)
        self.background.add(t)
        t.add_done_callback(self.background.discard)

    # -- decisions --------------------------------------------------------------------------

    async def schedule(
        self, peer: Peer, kept: common_pb2.Download | None, request: common_pb2.Download | None = None
    ) -> Answer:
        """Parents for ``peer``, or an instruction to go to the source; waits for the seed.
        ``kept``: what the peer registered with, as the scheduler keeps it; ``request``: the
        peer's own request with its credentials, for the seed (see trigger_seed)."""
        started = time.monotonic()
        entry = self.state.tasks[peer.task_id]
        deadline = started + self.cfg.seed_wait
        while True:
            answer = self.schedule_now(peer, started, kept, request)
            if answer is not None:
                return answer
            if time.monotonic() >= deadline:
                if self.task_limit_reached(entry, peer):
                    raise ScheduleError(
                        grpc.StatusCode.FAILED_PRECONDITION, "no parent and back-to-source limit reached"
                    )
                if not self.origin_full(entry, peer):  # else it waits for a parent or a free read
                    return self.back_to_source(entry, peer, f"no parent within {self.cfg.seed_wait:.0f}s")
            await entry.changed.wait(self.cfg.retry_interval)

    def schedule_now(
        self,
        peer: Peer,
        started: float,
        kept: common_pb2.Download | None,
        request: common_pb2.Download | None = None,
    ) -> Answer | None:
        """One round of :meth:`schedule`: an answer, or None when the peer must wait."""
        st = self.state
        entry = st.tasks[peer.task_id]
        if peer.id not in st.peers or peer.done:
            raise ScheduleError(grpc.StatusCode.CANCELLED, "peer left while being scheduled")
        if entry.task.known_length and entry.task.content_length == 0:
            self.schedules["empty"].inc()
            return answers.empty_task()
        parents = st.candidates(peer)
        if parents:
            entry.notify()  # with a parent, this peer is a candidate for others
            self.schedules["normal"].inc()
            self.metrics.schedule_seconds.observe(time.monotonic() - started)
            return Encoded(self.offer_encoded(entry, peer, [], parents))
        if (
            not self.source_busy(entry, peer)
            and self.trigger_seed(entry, peer, kept, request) is None
            # Nobody is fetching from the source and no seed can: this peer must, within the limits.
            and not self.task_limit_reached(entry, peer)
            and not self.origin_full(entry, peer)
        ):
            return self.back_to_source(entry, peer, "no seed peer and no parent")
        return None

    def offer(
        self, entry: TaskEntry, peer: Peer, kept: list[Candidate], new: list[Candidate]
    ) -> scheduler_pb2.AnnouncePeerResponse:
        """Make ``new`` parents of ``peer`` in the DAG and answer with them after ``kept``, and
        with the pieces it was handed from the source since its last answer."""
        return answers.decode(self.offer_encoded(entry, peer, kept, new))

    def offer_encoded(self, entry: TaskEntry, peer: Peer, kept: list[Candidate], new: list[Candidate]) -> bytes:
        """:meth:`offer`'s answer, encoded."""
        for c in new:
            peer.parents.add(c.peer.id)
            c.peer.children.add(peer.id)
        share = None
        told = entry.untold.pop(peer.id, None)
        if told:
            entry.share_serial += 1
            share = (entry.share_serial, sorted(told))
        data = self.answers.normal(entry, share, kept + new)
        if peer.id in entry.sharers:
            entry.answered.add(peer.id)
        return data

    def back_to_source(self, entry: TaskEntry, peer: Peer, why: str) -> scheduler_pb2.AnnouncePeerResponse:
        entry.back_to_source_peers.add(peer.id)
        self._origin_readers.setdefault(origin_of(entry.task.url), set()).add(peer.id)
        entry.source_readers.add(peer.id)  # sent to the source: its piece reports set the digests
        peer.need_back_to_source = True
        self.schedules["back_to_source"].inc()
        logger.info("peer {} of task {} goes back to source: {}", peer.id, peer.task_id[:12], why)
        return answers.back_to_source(why)

    # -- more parents as they appear --------------------------------------------------------

    def start_refresh(self, entry: TaskEntry, peer: Peer, out: AnswerSink) -> None:
        """Offer ``peer`` (downloading) more parents as they appear, through ``out``: at every
        change of its task, and every REFRESH_INTERVAL, until it stops wanting them."""
        entry.refreshers[peer.id] = (peer, out)

    def stop_refresh(self, entry: TaskEntry, peer: Peer) -> None:
        if entry.refreshing(peer):
            del entry.refreshers[peer.id]

    def _refresh_soon(self, entry: TaskEntry) -> None:
        """A change in ``entry``: its refreshers look again once this turn of the loop is over
        (every change of the turn, in every task, served by one callback)."""
        if not self._refresh_due:  # none waiting: no callback scheduled yet
            asyncio.get_running_loop().call_soon(self._refresh_due_tasks)
        self._refresh_due[entry.task.id] = entry

    def _refresh_due_tasks(self) -> None:
        due, self._refresh_due = self._refresh_due, {}
        for entry in due.values():
            self.refresh_task(entry)

    def refresh_task(self, entry: TaskEntry) -> None:
        for peer, out in list(entry.refreshers.values()):
            if entry.refreshing(peer) and not self.refresh_peer(entry, peer, out):
                self.stop_refresh(entry, peer)

    async def refresh_periodically(self) -> None:
        """Every REFRESH_INTERVAL each refresher looks again, change or not (a parent may have
        become usable without a change its task was told of)."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            for entry in list(self.state.tasks.values()):
                if entry.refreshers:
                    self._refresh_soon(entry)

    def refresh_peer(self, entry: TaskEntry, peer: Peer, out: AnswerSink) -> bool:
        """One look for more parents for a downloading peer, up to the limit; False once it
        wants no more (it left, finished or went to the source).

        Each offer is a NormalTaskResponse with all of the peer's parents, so a
        client that replaces its list and one that merges it both end up right.
        """
        st = self.state
        if peer.id not in st.peers or peer.done or peer.need_back_to_source:
            return False
        limit = st.parent_limit
        live = [pid for pid in peer.parents if pid in st.peers]
        new = []
        if len(live) < limit:
            new = st.candidates(peer, exclude=set(peer.parents))[: limit - len(live)]
        if not st.strategy.dag:
            # In a mesh a child is a parent too: a peer that fetches from this one is offered
            # back to it, beyond the limit, so every peer's pieces have somewhere to go.
            known = set(peer.parents) | {c.peer.id for c in new}
            new += [c for c in st.reciprocal(peer) if c.peer.id not in known]
        if not new:
            return True
        kept = [Candidate(st.peers[pid], st.hosts[st.peers[pid].host_id]) for pid in live]
        self.schedules["refresh"].inc()
        out.put_nowait(self.offer(entry, peer, kept, new))
        if not st.strategy.dag:
            entry.notify()  # the new parents now have a child to offer back
        return True

    # -- the source and the seed -------------------------------------------------------------

    def may_read_source(self, entry: TaskEntry, peer: Peer, host: Host) -> bool:
        """Whether a peer that registered asking for the source (``need_back_to_source``) is sent
        there: a seed host always (the reader the scheduler itself relies on), any other peer
        within the task's ``back_to_source_limit`` and the origin's ``origin_reads``. One that is
        not is scheduled like any peer."""
        if host.is_seed or not (self.task_limit_reached(entry, peer) or self.origin_full(entry, peer)):
            return True
        logger.info("peer {} of task {} asked for the source: scheduled instead (limits)", peer.id, peer.task_id[:12])
        peer.need_back_to_source = False
        return False

    def task_limit_reached(self, entry: TaskEntry, peer: Peer) -> bool:
        """``back_to_source_limit`` peers of the task were sent to the source, ``peer`` not among them."""
        sent = entry.back_to_source_peers
        return peer.id not in sent and len(sent) >= self.cfg.back_to_source_limit

    def origin_full(self, entry: TaskEntry, peer: Peer) -> bool:
        """``origin_reads`` peers, across tasks, are reading the task's origin now, ``peer`` not among them."""
        if not self.cfg.origin_reads:
            return False
        key = origin_of(entry.task.url)
        readers = self._origin_readers.get(key, set())
        st = self.state
        for pid in list(readers):  # those that finished, failed or left read no more
            p = st.peers.get(pid)
            if p is None or p.done or not (p.state is PeerState.BACK_TO_SOURCE or p.need_back_to_source):
                readers.discard(pid)
        if not readers:
            self._origin_readers.pop(key, None)
        full = peer.id not in readers and len(readers) >= self.cfg.origin_reads
        if full:
            logger.debug("origin {} has {} readers (scheduler.origin_reads): peer {} waits", key, len(readers), peer.id)
        return full

    def source_busy(self, entry: TaskEntry, peer: Peer) -> bool:
        """Someone (a seed or another peer) is fetching what ``peer`` needs from the source."""
        st = self.state
        wanted = st.range_of(peer.id)
        for pid in entry.task.peer_ids:
            p = st.peers.get(pid)
            if p is None or p.id == peer.id or p.id in peer.blocklist:
                continue  # a peer this one will not take pieces from is nothing to wait for
            if not covers(st.range_of(p.id), wanted, entry.layout):
                continue
            # Fetching from the source now: wait for its pieces. (A peer that has finished and
            # is still no candidate, on this host, say, will not become one by waiting.)
            if p.state is PeerState.BACK_TO_SOURCE or (p.need_back_to_source and not p.done):
                return True
        return self.seed_covers(entry, wanted)

    @staticmethod
    def seed_covers(entry: TaskEntry, wanted: ByteRange | None) -> bool:
        """The seed has been asked for (at least) ``wanted`` and has not failed since."""
        if not entry.seed_triggered_at or entry.seed_failed_at >= entry.seed_triggered_at:
            return False
        return any(covers(asked, wanted, entry.layout) for asked in entry.seed_requests)

    def trigger_seed(
        self,
        entry: TaskEntry,
        peer: Peer,
        kept: common_pb2.Download | None,
        request: common_pb2.Download | None = None,
    ) -> Host | None:
        """Ask the task's seed to fetch it from the source; None when no seed can.

        The seed gets the request as the scheduler keeps it (``kept``), without credentials.
        Only over mutual TLS does it get the requester's own ``request``, credentials included,
        for this one call (they are kept nowhere). Without TLS a private source refuses the
        seed, and the requester is sent to read the source itself. A request that names its
        task with a ``content_for_calculating_task_id`` its URL does not imply (a local client's
        choice) is no seed's to fill: a seed would store that URL's bytes under any id a peer
        names (a damselfly seed refuses it, ``admission.check_task_key``; an upstream one would
        not)."""
        if not self.cfg.seed_trigger:
            return None
        if kept is not None and kept.content_for_calculating_task_id not in ("", derived_task_key(kept.url)):
            return None
        seed = self.state.seed_for(entry.task.id)
        if seed is None or seed.id == peer.host_id:
            return None
        if (
            entry.seed_failed_at
            and time.time() - entry.seed_failed_at < SEED_FAILED_WINDOW
            and entry.seed_failed_at >= entry.seed_triggered_at
        ):
            return None
        wanted = self.state.range_of(peer.id)
        if self.seed_covers(entry, wanted):
            return seed  # already under way
        entry.seed_requests.append(wanted)
        entry.seed_triggered_at = time.time()
        self.metrics.seed_triggers.inc()
        download = common_pb2.Download()
        if request is not None and self.tls:
            download.CopyFrom(request)
        else:
            download.CopyFrom(kept or common_pb2.Download(url=entry.task.url))
        download.need_back_to_source = True
        download.output_path = ""
        self.spawn(self._run_seed(seed, entry, download))
        return seed

    async def _run_seed(self, seed: Host, entry: TaskEntry, download: common_pb2.Download) -> None:
        addr = f"{seed.ip}:{seed.port}"
        logger.info("triggering seed {} for task {}", seed.id, entry.task.id[:12])
        try:
            async with channel_to(addr, self.settings) as channel:
                stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
                call = stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download))
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as exc:
            entry.seed_failed_at = time.time()
            self.metrics.seed_trigger_failures.inc()
            logger.warning("seed {} failed task {}: {}", seed.id, entry.task.id[:12], exc.details())
            entry.notify()


def origin_of(url: str) -> str:
    """The origin a task's URL is read from, ``scheme://host:port``: the key of ``origin_reads``."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        port = None
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{port}" if port else f"{parts.scheme}://{host}"
