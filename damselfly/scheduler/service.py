"""The scheduler: ``scheduler.v2.Scheduler`` over gRPC, from the dragonfly-api stubs.

It keeps hosts, tasks and peers in memory, decides for each peer whether it
gets parents or goes to the source, and makes a seed peer fetch a new task from
the origin so that the origin is read once. Parent ranking is a strategy plugin.

Trust (docs/security.md): a request's credentials (Authorization, Cookie,
Proxy-Authorization, X-Amz-* headers, the sources' tokens and keys) are stripped when a
peer registers, so no task, StatTask, answer or log holds them; only the seed trigger
hands them on, to the one seed and over mutual TLS. A piece's digest is taken only from
whoever the scheduler sent to the source (a seed's wins). A peer registers only under its
Download's own task id (``wire.download_task_id``), and a task id its request chose with
``content_for_calculating_task_id`` is never handed to a seed. With ``security.tls`` every
caller shows a certificate of the cluster CA and acts only for its own hosts; caps
(``security.limits``) bound hosts, tasks and peers.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loguru import logger

from damselfly import rpc
from damselfly.config import Settings
from damselfly.contracts import Candidate, Strategy
from damselfly.core import ids
from damselfly.core.errors import InvalidArgument
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.core.piece import ByteRange, Layout, covers, share_blocks
from damselfly.core.task import Task, TaskState
from damselfly.plugin_manager import Plugins, build_plugins
from damselfly.rpc import h2grpc
from damselfly.rpc.wire import (
    PEER_HOST,
    PEER_TASK,
    download_task_id,
    has_secrets,
    host_from_proto,
    host_to_proto,
    length_delimited,
    offers_source_shares,
    peer_own_bytes,
    peer_to_proto,
    piece_from_proto,
    piece_to_proto,
    public_headers,
    redact_url,
    set_time,
    source_share_to_proto,
    strip_secrets,
    task_to_proto,
    valid_piece_digest,
)
from damselfly.scheduler import preheat
from damselfly.security import tls
from damselfly.security.admission import derived_task_key
from damselfly.security.identity import PeerIdentity, identity_of
from damselfly.telemetry.metrics import SchedulerMetrics, serve_metrics

_CLOSE = object()
# field numbers: AnnouncePeerResponse.normal_task_response, NormalTaskResponse.candidate_parents
_NORMAL_TASK_RESPONSE, _CANDIDATE_PARENTS = 2, 1
_response_from = scheduler_pb2.AnnouncePeerResponse.FromString
_new, _set_peer, _set_host = object.__new__, Candidate.peer.__set__, Candidate.host.__set__  # type: ignore[attr-defined]


_NORMAL_HOST = HostType.NORMAL  # h.type is _NORMAL_HOST: not h.is_seed, without the property
SEED_FAILED_WINDOW = 1800.0  # seconds a seed that failed a task is not asked for it again (upstream's)
REFRESH_INTERVAL = 2.0  # seconds: the longest a downloading peer waits for another look at its parents
# Who may set a piece's authoritative digest: nobody the scheduler did not send to the source;
# a peer it sent there (told to go back to source, or handed a share of the read); a seed
# host's peer, whose digest wins over a peer's (a peer can always get itself sent to the source).
NOT_SENT, SENT_PEER, SEED = 0, 1, 2
# Under mutual TLS, the certificate roles that may preheat: an operator's tool (`damselfly
# certs issue --role client`), not any cluster member.
OPERATOR_ROLES = frozenset({"client"})


class ScheduleError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Encoded:
    """A normal answer as the scheduler assembled it, already encoded: h2grpc's callback form
    writes the bytes as they are (no parse into a message and serialize back); anything else
    reads :attr:`message`."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    @property
    def message(self) -> scheduler_pb2.AnnouncePeerResponse:
        return _response_from(self.data)


Answer = scheduler_pb2.AnnouncePeerResponse | Encoded


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
    """The answers of one AnnouncePeer stream served in h2grpc's callback form: each written
    as it is made; the stream's end or error ends the call."""

    __slots__ = ("context",)

    def __init__(self, context: h2grpc.ServicerContext):
        self.context = context

    def put_nowait(self, item: object) -> None:
        if type(item) is Encoded:
            self.context.write_encoded_nowait(item.data)
        elif item is _CLOSE:
            self.context.end()
        elif isinstance(item, ScheduleError):
            self.context.end(item.code, str(item))
        else:
            self.context.write_nowait(item)


class Signal:
    """Wakes whoever waits on it; cheaper than an asyncio.Event per change (a decision
    notifies its task's waiters several times)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def wait(self, seconds: float | None = None) -> None:
        """Until the next :meth:`fire`, or ``seconds`` (None: no limit)."""
        loop = asyncio.get_running_loop()
        f: asyncio.Future[None] = loop.create_future()
        if len(self._waiters) >= 64:  # waits that were cancelled stay until a fire; drop them
            self._waiters = [w for w in self._waiters if not w.done()]
        self._waiters.append(f)
        timer = None if seconds is None else loop.call_later(seconds, _expire, f)
        try:
            await f
        finally:
            if timer is not None:
                timer.cancel()


def _expire(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)


@dataclass
class TaskEntry:
    task: Task
    changed: Signal = field(default_factory=Signal)
    seed_triggered_at: float = 0.0
    seed_failed_at: float = 0.0
    seed_requests: list[ByteRange | None] = field(default_factory=list)  # what the seed was asked for
    back_to_source_peers: set[str] = field(default_factory=set)
    # the peers the scheduler answered NeedBackToSource (back_to_source_peers also counts those
    # that only said they went): with the seed's, their piece reports set the task's digests
    source_readers: set[str] = field(default_factory=set)
    digest_rank: dict[int, int] = field(default_factory=dict)  # who set each piece's digest (SENT_PEER, SEED)
    digested: int = 0  # pieces with an authoritative digest
    ignored_reporters: set[str] = field(default_factory=set)  # peers whose digests were ignored (logged once)
    # A shared source read (scheduler.source_shares): the peers that offered to take a share,
    # with the queue of answers on their streams; the pieces each was handed and has not
    # reported; those handed but not yet in an answer to it; the peers answered so far.
    sharers: dict[str, Outbox | StreamOut] = field(default_factory=dict)
    shares: dict[str, set[int]] = field(default_factory=dict)
    untold: dict[str, set[int]] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    shares_planned: bool = False
    share_serial: int = 0
    # the task's pieces as protobufs, in order, for every answer; rebuilt after record_piece (the
    # only way a piece enters the scheduler's task)
    piece_pbs: list[common_pb2.Piece] | None = None
    _task_pb: common_pb2.Task | None = None
    _task_ident: tuple[str, str, str, str] | None = None
    # the downloading peers offered more parents as they appear (SchedulerService.refresh_peer),
    # with their answer queues; told of every change through on_change
    refreshers: dict[str, tuple[Peer, Outbox | StreamOut]] = field(default_factory=dict)
    on_change: Callable[[TaskEntry], None] | None = None

    def record_piece(self, pb: common_pb2.Piece, rank: int = SEED) -> bool:
        """Keep a piece as the one who read it from the source reported it, its digest the
        authoritative one for children to check the piece against. A digest once set is kept
        against a different one from an authority of the same rank (a conflict, logged); a
        seed's replaces a peer's. False when nothing changed."""
        n = pb.number
        old = self.task.pieces.get(n)
        if old is not None and old.digest:
            if old.digest == pb.digest or not pb.digest:
                return False
            kept_rank = self.digest_rank.get(n, SEED)
            if rank <= kept_rank:
                logger.warning(
                    "task {} piece {}: digest {} conflicts with {}; the first is kept",
                    self.task.id[:12], n, pb.digest, old.digest,
                )  # fmt: skip
                return False
            logger.warning(
                "task {} piece {}: a seed's digest {} replaces {}", self.task.id[:12], n, pb.digest, old.digest
            )
        elif pb.digest:
            self.digested += 1
        self.task.pieces[n] = piece_from_proto(pb)
        if pb.digest:
            self.digest_rank[n] = rank
        self.piece_pbs = None
        return True

    @property
    def digests_complete(self) -> bool:
        """The scheduler holds an authoritative digest for every piece of the task."""
        t = self.task
        if not t.known_length or self.digested < t.piece_count:
            return False  # (the count may include numbers reported before the length was known)
        count = t.piece_count
        return sum(1 for n in self.digest_rank if n < count) >= count

    def task_proto(self) -> common_pb2.Task:
        """The task as answers carry it. One message, kept and brought up to date in place:
        callers copy it into their answer and must not change it."""
        t = self.task
        ident = (t.url, t.digest, t.tag, t.application)
        pb = self._task_pb
        if pb is None or self._task_ident != ident:
            pb = self._task_pb = task_to_proto(t, with_pieces=False)
            self._task_ident = ident
            self.piece_pbs = None
        if self.piece_pbs is None:
            self.piece_pbs = [piece_to_proto(p) for p in sorted(t.pieces.values(), key=lambda p: p.number)]
            del pb.pieces[:]
            pb.pieces.extend(self.piece_pbs)
        # the fields that change after registration (task_to_proto's values)
        pb.content_length = max(t.content_length, 0)
        pb.piece_count = t.piece_count
        pb.size_scope = common_pb2.EMPTY if t.content_length == 0 else common_pb2.NORMAL
        pb.state = t.state.value
        pb.peer_count = len(t.peer_ids)
        set_time(pb.updated_at, t.updated_at)
        return pb

    def notify(self) -> None:
        self.changed.fire()
        if self.refreshers and self.on_change is not None:
            self.on_change(self)


def _who(ident: PeerIdentity) -> str:
    """A certificate's holder in a message: its common name and addresses."""
    names = sorted(ident.ips | ident.dns)
    return f"{ident.common_name or '?'} [{', '.join(names)}]"


def _refreshing(entry: TaskEntry, peer: Peer) -> bool:
    """``peer`` itself is among the task's refreshers (not a peer registered again under its id)."""
    r = entry.refreshers.get(peer.id)
    return r is not None and r[0] is peer


def _is_ranged(download: common_pb2.Download | None) -> bool:
    return download is not None and download.range.length > 0


def _layout(entry: TaskEntry) -> Layout | None:
    """The task's piece layout once its length is known: ranges are then compared piece by piece."""
    return entry.task.layout if entry.task.known_length else None


class SchedulerState:
    """Hosts, tasks and peers; every method is plain logic on this state."""

    def __init__(self, settings: Settings, strategy: Strategy):
        self.settings = settings
        self.cfg = settings.scheduler
        self.strategy = strategy
        self.hosts: dict[str, Host] = {}
        self.tasks: dict[str, TaskEntry] = {}
        self.peers: dict[str, Peer] = {}
        self.downloads: dict[str, common_pb2.Download] = {}  # what each peer registered with
        self._ranged = 0  # how many of them are for a byte range
        self.announced: dict[str, common_pb2.Host] = {}  # each host as it last announced itself
        self.on_task_change: Callable[[TaskEntry], None] | None = None  # each new task's on_change

    def host_proto(self, h: Host) -> common_pb2.Host:
        """``host_to_proto(h)``, kept while the fields it carries stay the same."""
        key = (
            h.type, h.hostname, h.ip, h.port, h.download_port, h.proxy_port, h.disable_shared,
            h.idc, h.location, h.max_tx_bandwidth, h.tx_bandwidth,
        )  # fmt: skip
        hit = h.wire_cache
        if hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[return-value]
        pb = host_to_proto(h)
        h.wire_cache = (key, pb, length_delimited(PEER_HOST, pb.SerializeToString()))
        return pb

    def host_field(self, h: Host) -> bytes:
        """:meth:`host_proto` encoded as a Peer message's host field."""
        self.host_proto(h)
        return h.wire_cache[2]  # type: ignore[index]

    def peer_part(self, p: Peer) -> bytes:
        """``peer_own_bytes(p)``, kept while the fields it carries stay the same (a parent is
        named in many answers; a finished one never changes)."""
        key = (p.state, p.updated_at, p.priority, p.need_back_to_source, p.created_at)
        hit = p.wire_cache
        if hit is not None and hit[0] == key:
            return hit[1]
        part = peer_own_bytes(p)
        p.wire_cache = (key, part)
        return part

    def entry(self, task_id: str) -> TaskEntry:
        e = self.tasks.get(task_id)
        if e is None:
            now = time.time()
            e = self.tasks[task_id] = TaskEntry(Task(id=task_id, created_at=now, updated_at=now))
            e.on_change = self.on_task_change
        return e

    def range_of(self, peer_id: str) -> ByteRange | None:
        """The byte range a peer downloads (None: the whole task)."""
        d = self.downloads.get(peer_id)
        return (d.range.start, d.range.length) if d is not None and d.range.length > 0 else None

    def seed_for(self, task_id: str) -> Host | None:
        """The seed host for a task: a stable hash of the task id over live seeds."""
        seeds = sorted((h for h in self.hosts.values() if h.is_seed), key=lambda h: h.id)
        if not seeds:
            return None
        return max(seeds, key=lambda h: hashlib.sha256((h.id + task_id).encode()).digest())

    def descendants(self, peer_id: str) -> set[str]:
        seen: set[str] = set()
        stack = [peer_id]
        while stack:
            p = self.peers.get(stack.pop())
            if p is None:
                continue
            for c in p.children:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return seen

    def candidates(self, child: Peer, exclude: set[str] | frozenset[str] = frozenset()) -> list[Candidate]:
        entry = self.tasks[child.task_id]
        child_host = self.hosts[child.host_id]
        # (a peer with no children yet, as at its registration, has no descendants)
        below = self.descendants(child.id) if self.strategy.dag and child.children else ()
        limit = self.parent_limit
        wanted = max(self.cfg.filter_parent_limit, limit)
        child_range, layout = self._range_view(child, entry)
        # A random order, cut at ``wanted`` usable ones (upstream samples before it filters too):
        # parents that score the same share the load, and a task with thousands of peers costs
        # a scheduling decision no more than one with ``wanted``. A small task is shuffled; a
        # large one is walked from a random point (as upstream's map iteration does).
        ids = entry.task.peer_ids.items
        n = len(ids)
        order: Iterable[str]
        if n <= 2 * wanted:
            order = random.sample(ids, n)
        else:  # from a random point, by index (islice would step over the first ``start``)
            start = random.randrange(n)
            order = map(ids.__getitem__, itertools.chain(range(start, n), range(start)))
        skip = {child.id}
        skip.update(child.blocklist, below, exclude)
        pool = self._servable(order, skip, child, child_range, layout, wanted, entry)
        ranked = self.strategy.rank(Candidate(child, child_host), pool, entry.task)
        return ranked[:limit]

    def reciprocal(self, peer: Peer) -> list[Candidate]:
        """The peers fetching from ``peer`` that could serve it too (for mesh strategies)."""
        entry = self.tasks[peer.task_id]
        child_range, layout = self._range_view(peer, entry)
        order = sorted(peer.children - peer.parents - peer.blocklist)
        return self._servable(order, frozenset(), peer, child_range, layout, len(order), entry)

    def _range_view(self, child: Peer, entry: TaskEntry) -> tuple[ByteRange | None, Layout | None]:
        """``child``'s range, and the task's layout to compare ranges by (None while no peer
        asked for a range: then every parent holds what a child wants)."""
        if not self._ranged:
            return None, None  # no peer is ranged, this one neither
        return self.range_of(child.id), _layout(entry)

    def _servable(
        self,
        pids: Iterable[str],
        skip: set[str] | frozenset[str],
        child: Peer,
        child_range: ByteRange | None,
        layout: Layout | None,
        limit: int,
        entry: TaskEntry,
    ) -> list[Candidate]:
        """The first ``limit`` peers among ``pids`` (but not in ``skip``) that can serve ``child``
        (whose range is ``child_range``), in order: known, on another host that shares, in a
        state to serve, holding the child's range, and, while downloading, not a cost outlier
        and with a parent of its own or on a seed (a normal peer with no parent has nothing to
        give yet). A normal host's ``metadata_only`` peer (a claim to hold the task that nobody
        checked) only once the scheduler holds every piece's authoritative digest, so that its
        children can check each piece it serves.

        The decision's hottest loop: the checks inline, with what they read bound once."""
        peers_get, hosts_get = self.peers.get, self.hosts.get
        own_host, ranged = child.host_id, self._ranged
        new, set_peer, set_host = _new, _set_peer, _set_host
        running, to_source, succeeded = PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED
        found: list[Candidate] = []
        claims_ok: bool | None = None  # entry.digests_complete, read once and only when needed
        for pid in pids:
            if pid in skip:
                continue
            p = peers_get(pid)
            if p is None or p.host_id == own_host:
                continue
            state = p.state
            if state is not running and state is not to_source and state is not succeeded:
                continue
            h = hosts_get(p.host_id)
            if h is None or h.disable_shared:
                continue
            if ranged and not covers(self.range_of(pid), child_range, layout):
                continue  # a ranged parent never holds the pieces outside its range
            if state is running and (p.is_bad() or (not p.parents and h.type is _NORMAL_HOST)):
                continue  # is_bad is only ever true for an eligible peer while it runs
            if p.metadata_only and h.type is _NORMAL_HOST:
                if claims_ok is None:
                    claims_ok = entry.digests_complete
                if not claims_ok:
                    continue
            c = new(Candidate)  # Candidate(p, h) at half the cost of a frozen dataclass's __init__
            set_peer(c, p)
            set_host(c, h)
            found.append(c)
            if len(found) >= limit:
                break
        return found

    @property
    def parent_limit(self) -> int:
        return self.strategy.parent_limit or self.cfg.candidate_parent_limit

    def set_download(self, peer_id: str, download: common_pb2.Download) -> None:
        self._ranged += _is_ranged(download) - _is_ranged(self.downloads.get(peer_id))
        self.downloads[peer_id] = download

    def remove_peer(self, peer_id: str) -> None:
        p = self.peers.pop(peer_id, None)
        self._ranged -= _is_ranged(self.downloads.pop(peer_id, None))
        if p is None:
            return
        for other_id in p.parents | p.children:
            other = self.peers.get(other_id)
            if other:
                other.parents.discard(peer_id)
                other.children.discard(peer_id)
        e = self.tasks.get(p.task_id)
        if e:
            e.task.peer_ids.discard(peer_id)
            e.sharers.pop(peer_id, None)
            e.untold.pop(peer_id, None)
            e.answered.discard(peer_id)
            e.refreshers.pop(peer_id, None)
            e.notify()
        h = self.hosts.get(p.host_id)
        if h:
            h.peer_ids.discard(peer_id)

    def remove_host(self, host_id: str) -> None:
        self.announced.pop(host_id, None)
        h = self.hosts.pop(host_id, None)
        if h:
            for pid in list(h.peer_ids):
                self.remove_peer(pid)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, settings: Settings, plugins: Plugins, metrics: SchedulerMetrics):
        self.settings = settings
        self.cfg = settings.scheduler
        self.state = SchedulerState(settings, plugins.make_strategy(self.cfg.strategy))
        self.metrics = metrics
        # the label children counted on every decision and piece report, looked up once
        self.schedules = {k: metrics.schedule.labels(k) for k in ("empty", "normal", "refresh", "back_to_source")}
        self.reports = {k: metrics.piece_reports.labels(k) for k in ("back_to_source", "remote_peer")}
        self._background: set[asyncio.Task[None]] = set()
        self._gauges_bound = False
        self._refresh_due: dict[str, TaskEntry] = {}  # tasks changed in this turn of the loop
        self.state.on_task_change = self._refresh_soon
        self.limits = settings.security.limits
        # with mutual TLS every caller has a certificate, and may act only for its own hosts
        self.tls = settings.security.tls.enabled
        self.refused = {k: metrics.refused.labels(k) for k in ("limit", "permission", "digest", "task_id")}

    # -- who may ask -------------------------------------------------------------------

    def identity(self, context: object) -> PeerIdentity | None:
        """The caller's certificate identity; None without TLS (nobody is authenticated).
        Under TLS a caller with none is refused (the server requires client certificates)."""
        if not self.tls:
            return None
        ident = identity_of(context)
        if ident is None:
            self.refused["permission"].inc()
            raise ScheduleError(grpc.StatusCode.PERMISSION_DENIED, "a client certificate is required (mutual TLS)")
        return ident

    def owns_host(self, ident: PeerIdentity, host_id: str) -> bool:
        """``host_id`` is a host of the certificate's holder: announced with addresses the
        certificate names or, not known (any more), one of the ids those addresses make."""
        h = self.state.hosts.get(host_id)
        if h is not None:
            return ident.may_be_host(h.ip, h.hostname)
        names = set(ident.dns) | ({ident.common_name} if ident.common_name else set())
        return any(
            host_id == ids.host_id(ip, name, seed=seed) for ip in ident.ips for name in names for seed in (False, True)
        )

    def check_owner(self, ident: PeerIdentity | None, host_id: str, what: str) -> None:
        if ident is not None and not self.owns_host(ident, host_id):
            self.refused["permission"].inc()
            raise ScheduleError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what}: host {host_id} is not the caller's ({_who(ident)}); only its owner may",
            )

    def check_announce(self, ident: PeerIdentity, pb: common_pb2.Host) -> None:
        """A host announces only itself: its ip and hostname named by the certificate, its id the
        one they make, and a seed type only with a ``seed`` certificate."""
        seed = pb.type != HostType.NORMAL
        why = ""
        if not ident.may_be_host(pb.ip, pb.hostname):
            why = f"the certificate ({_who(ident)}) does not name ip {pb.ip} and hostname {pb.hostname}"
        elif seed and not ident.is_seed:
            why = "only a certificate with role seed may announce a seed host"
        elif pb.id != (expected := ids.host_id(pb.ip, pb.hostname, seed=seed)):
            why = f"host id {pb.id} is not {expected}, the id of ip {pb.ip} and hostname {pb.hostname}"
        if why:
            self.refused["permission"].inc()
            raise ScheduleError(grpc.StatusCode.PERMISSION_DENIED, f"AnnounceHost refused: {why}")

    def check_task_id(self, task_id: str, download: common_pb2.Download) -> None:
        """A peer registers under its Download's own task id (``wire.download_task_id``, what a
        daemon computes from the same request), never one it names: otherwise a peer could put
        one URL's bytes, and their piece digests, under another URL's task."""
        try:
            expected = download_task_id(download)
        except InvalidArgument as exc:
            self.refused["task_id"].inc()
            raise ScheduleError(grpc.StatusCode.INVALID_ARGUMENT, f"register refused: {exc}") from None
        if task_id != expected:
            self.refused["task_id"].inc()
            raise ScheduleError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"register refused: task id {task_id[:128]!r} is not its download's ({expected})",
            )

    def over_limit(self, what: str, limit: int) -> ScheduleError:
        self.refused["limit"].inc()
        return ScheduleError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the scheduler holds its maximum of {limit} {what} (security.limits.max_{what}); no new one is taken",
        )

    def _spawn(self, coro: object) -> None:
        t = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _refresh_gauges(self) -> None:
        """The gauges are read when /metrics is scraped (not on every change: O(hosts) each)."""
        if self._gauges_bound:
            return
        self._gauges_bound = True
        st = self.state
        self.metrics.hosts.labels("seed").set_function(lambda: sum(1 for h in st.hosts.values() if h.is_seed))
        self.metrics.hosts.labels("normal").set_function(lambda: sum(1 for h in st.hosts.values() if not h.is_seed))
        self.metrics.tasks.set_function(lambda: len(st.tasks))
        self.metrics.peers.set_function(lambda: len(st.peers))

    # -- hosts ---------------------------------------------------------------------

    async def AnnounceHost(
        self, request: scheduler_pb2.AnnounceHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        pb = request.host
        if not pb.id or not pb.ip or not pb.port:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host needs id, ip and port")
        try:
            ident = self.identity(context)
            if ident is not None:
                self.check_announce(ident, pb)
            if pb.id not in self.state.hosts and len(self.state.hosts) >= self.limits.max_hosts:
                raise self.over_limit("hosts", self.limits.max_hosts)
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))
        now = time.time()
        host = host_from_proto(pb, now)
        if request.interval.seconds:
            host.interval = request.interval.seconds
        old = self.state.hosts.get(pb.id)
        if old is not None:
            host.peer_ids = old.peer_ids
            host.upload_content_length = old.upload_content_length
            host.concurrent_upload_pieces = old.concurrent_upload_pieces
        self.state.hosts[pb.id] = host
        self.state.announced[pb.id] = pb
        self._refresh_gauges()
        logger.debug("host {} announced ({}:{}, seed={})", pb.id, pb.ip, pb.port, host.is_seed)
        return empty_pb2.Empty()

    async def ListHosts(
        self, request: scheduler_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListHostsResponse:
        st = self.state
        return scheduler_pb2.ListHostsResponse(
            hosts=[st.announced.get(h.id) or host_to_proto(h) for h in st.hosts.values()]
        )

    async def DeleteHost(
        self, request: scheduler_pb2.DeleteHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._owner_only(context, request.host_id, "DeleteHost")
        self.state.remove_host(request.host_id)
        self._refresh_gauges()
        return empty_pb2.Empty()

    async def gc(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.host_gc_interval)
            self.collect(time.time())

    def collect(self, now: float) -> None:
        """Forget silent hosts (and their peers), peers past their TTL, and tasks with no peer."""
        st = self.state
        for h in [h for h in st.hosts.values() if h.expired(now)]:
            logger.info("host {} went silent; forgetting it and its peers", h.id)
            st.remove_host(h.id)
        for p in [p for p in st.peers.values() if now - p.updated_at > self.cfg.peer_ttl]:
            st.remove_peer(p.id)
        for task_id in [t for t, e in st.tasks.items() if not e.task.peer_ids and now - e.task.updated_at > 60]:
            del st.tasks[task_id]
        self._refresh_gauges()

    # -- tasks and peers -------------------------------------------------------------

    async def _operator_only(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Abort unless the caller's certificate has an operator's role (anyone may without TLS)."""
        try:
            ident = self.identity(context)
            if ident is not None and not ident.roles & OPERATOR_ROLES:
                self.refused["permission"].inc()
                raise ScheduleError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{what} is an operator's request: the caller's certificate ({_who(ident)}) has no role "
                    f"{' or '.join(sorted(OPERATOR_ROLES))}",
                )
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))

    async def PreheatImage(
        self, request: scheduler_pb2.PreheatImageRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._operator_only(context, "PreheatImage")
        await preheat.preheat_image(self, request, context)
        return empty_pb2.Empty()

    async def StatImage(
        self, request: scheduler_pb2.StatImageRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.StatImageResponse:
        return await preheat.stat_image(self, request, context)  # type: ignore[no-any-return]

    async def PreheatFile(
        self, request: scheduler_pb2.PreheatFileRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._operator_only(context, "PreheatFile")
        await preheat.preheat_file(self, request, context)
        return empty_pb2.Empty()

    async def StatTask(
        self, request: scheduler_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        e = self.state.tasks.get(request.task_id)
        if e is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return task_to_proto(e.task)

    async def DeleteTask(
        self, request: scheduler_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._owner_only(context, request.host_id, "DeleteTask")
        e = self.state.tasks.get(request.task_id)
        if e is not None:
            for pid in list(e.task.peer_ids):
                p = self.state.peers.get(pid)
                if p is not None and p.host_id == request.host_id:
                    self.state.remove_peer(pid)
        return empty_pb2.Empty()

    async def StatPeer(
        self, request: scheduler_pb2.StatPeerRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Peer:
        p = self.state.peers.get(request.peer_id)
        if p is None or p.task_id != request.task_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"peer {request.peer_id} not found")
        return peer_to_proto(p, self.state.hosts[p.host_id], self.state.tasks[p.task_id].task)

    async def DeletePeer(
        self, request: scheduler_pb2.DeletePeerRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        p = self.state.peers.get(request.peer_id)
        if p is None:
            return empty_pb2.Empty()
        await self._owner_only(context, p.host_id, "DeletePeer")
        self.state.remove_peer(request.peer_id)
        self._refresh_gauges()
        return empty_pb2.Empty()

    async def _owner_only(self, context: grpc.aio.ServicerContext, host_id: str, what: str) -> None:
        """Abort unless the caller may act for ``host_id`` (anyone may without TLS)."""
        try:
            self.check_owner(self.identity(context), host_id, what)
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))

    # -- the announce stream -------------------------------------------------------------

    def _announce_peer_callbacks(self, requests: rpc.RequestStream, context: h2grpc.ServicerContext) -> None:
        """AnnouncePeer on damselfly.rpc.h2grpc: each request handled as it is read, each answer
        written as it is made, and no task for the stream."""
        self.metrics.announce_peer.inc()
        session = _PeerSession(
            self, StreamOut(context), shares_ok=offers_source_shares(context.invocation_metadata()), context=context
        )
        context.add_done_callback(lambda _: session.close())
        requests.listen(session.on_request, session.on_requests_end)

    @h2grpc.callback_form(_announce_peer_callbacks)
    async def AnnouncePeer(
        self, request_iterator: AsyncIterator[scheduler_pb2.AnnouncePeerRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.AnnouncePeerResponse]:
        self.metrics.announce_peer.inc()
        out = Outbox()  # (grpcio) a task reads the requests, this generator yields the answers
        session = _PeerSession(
            self, out, shares_ok=offers_source_shares(context.invocation_metadata()), context=context
        )
        reader = asyncio.get_running_loop().create_task(session.consume(request_iterator))
        try:
            while True:
                item = await out.get()
                if item is _CLOSE:
                    return
                if isinstance(item, ScheduleError):
                    await context.abort(item.code, str(item))
                yield item.message if type(item) is Encoded else item  # type: ignore[union-attr,misc]
        finally:
            reader.cancel()
            session.close()

    # -- scheduling ------------------------------------------------------------------------

    async def schedule(self, peer: Peer, request: common_pb2.Download | None = None) -> Answer:
        """Parents for ``peer``, or an instruction to go to the source; waits for the seed.
        ``request``: the peer's own request with its credentials, for the seed (see _trigger_seed)."""
        started = time.monotonic()
        entry = self.state.tasks[peer.task_id]
        deadline = started + self.cfg.seed_wait
        while True:
            answer = self.schedule_now(peer, started, request)
            if answer is not None:
                return answer
            if time.monotonic() >= deadline:
                if len(entry.back_to_source_peers) >= self.cfg.back_to_source_limit:
                    raise ScheduleError(
                        grpc.StatusCode.FAILED_PRECONDITION, "no parent and back-to-source limit reached"
                    )
                return self._back_to_source(entry, peer, f"no parent within {self.cfg.seed_wait:.0f}s")
            await entry.changed.wait(self.cfg.retry_interval)

    def schedule_now(self, peer: Peer, started: float, request: common_pb2.Download | None = None) -> Answer | None:
        """One round of :meth:`schedule`: an answer, or None when the peer must wait."""
        st = self.state
        entry = st.tasks[peer.task_id]
        if peer.id not in st.peers or peer.done:
            raise ScheduleError(grpc.StatusCode.CANCELLED, "peer left while being scheduled")
        if entry.task.known_length and entry.task.content_length == 0:
            self.schedules["empty"].inc()
            return scheduler_pb2.AnnouncePeerResponse(empty_task_response=scheduler_pb2.EmptyTaskResponse())
        parents = st.candidates(peer)
        if parents:
            entry.notify()  # with a parent, this peer is a candidate for others
            self.schedules["normal"].inc()
            self.metrics.schedule_seconds.observe(time.monotonic() - started)
            return Encoded(self._offer_encoded(entry, peer, [], parents))
        if not self._source_busy(entry, peer) and self._trigger_seed(entry, peer, request) is None:
            # Nobody is fetching from the source and no seed can: this peer must.
            return self._back_to_source(entry, peer, "no seed peer and no parent")
        return None

    def start_refresh(self, entry: TaskEntry, peer: Peer, out: Outbox | StreamOut) -> None:
        """Offer ``peer`` (downloading) more parents as they appear, through ``out``: at every
        change of its task, and every REFRESH_INTERVAL, until it stops wanting them."""
        entry.refreshers[peer.id] = (peer, out)

    def stop_refresh(self, entry: TaskEntry, peer: Peer) -> None:
        if _refreshing(entry, peer):
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
            if _refreshing(entry, peer) and not self.refresh_peer(entry, peer, out):
                self.stop_refresh(entry, peer)

    async def refresh_periodically(self) -> None:
        """Every REFRESH_INTERVAL each refresher looks again, change or not (a parent may have
        become usable without a change its task was told of)."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            for entry in list(self.state.tasks.values()):
                if entry.refreshers:
                    self._refresh_soon(entry)

    def refresh_peer(self, entry: TaskEntry, peer: Peer, out: Outbox | StreamOut) -> bool:
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
        out.put_nowait(self._offer(entry, peer, kept, new))
        if not st.strategy.dag:
            entry.notify()  # the new parents now have a child to offer back
        return True

    def _offer(
        self, entry: TaskEntry, peer: Peer, kept: list[Candidate], new: list[Candidate]
    ) -> scheduler_pb2.AnnouncePeerResponse:
        """Make ``new`` parents of ``peer`` in the DAG and answer with them after ``kept``, and
        with the pieces it was handed from the source since its last answer."""
        return _response_from(self._offer_encoded(entry, peer, kept, new))

    def _offer_encoded(self, entry: TaskEntry, peer: Peer, kept: list[Candidate], new: list[Candidate]) -> bytes:
        """:meth:`_offer`'s answer, encoded."""
        for c in new:
            peer.parents.add(c.peer.id)
            c.peer.children.add(peer.id)
        # The answer is assembled from encodings (the task's once, each host's and each
        # parent's own fields as kept): about 60% of the cost of filling every parent in, task
        # and host copied into each. h2grpc writes it as it is; the rest read it as a message.
        task_pb = entry.task_proto()
        task_field = length_delimited(PEER_TASK, task_pb.SerializeToString())
        parents: list[bytes] = []
        told = entry.untold.pop(peer.id, None)
        if told:
            entry.share_serial += 1
            share = source_share_to_proto(entry.share_serial, sorted(told), entry.task, task_pb)
            parents.append(length_delimited(_CANDIDATE_PARENTS, share.SerializeToString()))
        st = self.state
        for c in kept + new:
            pb = st.peer_part(c.peer) + task_field + st.host_field(c.host)
            parents.append(length_delimited(_CANDIDATE_PARENTS, pb))
        if peer.id in entry.sharers:
            entry.answered.add(peer.id)
        return length_delimited(_NORMAL_TASK_RESPONSE, b"".join(parents))

    # -- shared source reads ------------------------------------------------------------------

    def plan_shares(self, entry: TaskEntry, seed: Peer) -> scheduler_pb2.AnnouncePeerResponse | None:
        """Split the task's read of the source between its seed and the peers waiting for it.

        Every host's link is then busy from the start with pieces nobody else has, instead of
        all of them trailing the one link the seed reads the origin through. Each piece is
        still read once. None when there is nobody to share with: the seed reads it all.
        """
        if entry.shares_planned or not entry.task.known_length or entry.task.piece_count == 0:
            return None
        waiting = sorted((p for p, h in self._live_sharers(entry) if not h.is_seed), key=lambda p: p.id)
        if not waiting:
            return None
        unheld = self.unheld(entry)
        if not unheld:
            return None
        entry.shares_planned = True
        readers = [seed, *waiting]
        if self.cfg.source_share_readers:
            readers = readers[: self.cfg.source_share_readers]
        for p, part in zip(readers, share_blocks(len(unheld), len(readers)), strict=True):
            if part:
                block = unheld[part.start : part.stop]  # contiguous runs of what nobody holds yet
                entry.shares[p.id] = set(block)
                entry.untold[p.id] = set(block)
                self.metrics.source_share_pieces.labels("planned").inc(len(block))
        seed.need_back_to_source = False  # it reads its share and fetches the rest like any peer
        logger.info("task {}: the source read is shared among {} peers", entry.task.id[:12], len(readers))
        return self._offer(entry, seed, [], [])

    def held(self, entry: TaskEntry, *, but: Peer | None = None) -> set[int]:
        """The pieces of the task its peers (``but`` one) hold."""
        out: set[int] = set()
        for pid in entry.task.peer_ids:
            p = self.state.peers.get(pid)
            if p is not None and p is not but:
                out |= p.finished_pieces
        return out

    def unheld(self, entry: TaskEntry) -> list[int]:
        """The task's pieces no peer of it holds, in order: what a shared read still has to read
        (after a scheduler restart, say, peers that hold the task announce it first)."""
        held = self.held(entry)
        return [n for n in range(entry.task.piece_count) if n not in held]

    def _live_sharers(self, entry: TaskEntry) -> list[tuple[Peer, Host]]:
        """The peers of the task that offered to read a share and are still downloading."""
        st = self.state
        live = []
        for pid in entry.sharers:
            p = st.peers.get(pid)
            h = st.hosts.get(p.host_id) if p is not None else None
            if p is not None and h is not None and not p.done:
                live.append((p, h))
        return live

    def hand_on_shares(self, entry: TaskEntry, peer: Peer, why: str, *, gone: bool = False) -> None:
        """``peer`` will not read the rest of its share (it failed, or left): another sharer
        of the task takes it, the seed first; an answered one hears of it at once. When the
        peer is ``gone``, the pieces it read from the source that no other peer holds yet go
        too: nobody else can serve them, and waiting for a parent would stall every child."""
        left = entry.shares.pop(peer.id, set())
        entry.untold.pop(peer.id, None)
        entry.sharers.pop(peer.id, None)
        if gone and entry.shares_planned and peer.finished_pieces:
            left |= self._orphans(entry, peer)
        if not left:
            return
        heirs = [(not h.is_seed, len(entry.shares.get(p.id, ())), p.id, p) for p, h in self._live_sharers(entry)]
        if not heirs:
            logger.warning(
                "task {}: {} pieces of peer {}'s source share have nobody to read them ({})",
                entry.task.id[:12],
                len(left),
                peer.id,
                why,
            )
            return
        heir = min(heirs)[3]
        entry.shares.setdefault(heir.id, set()).update(left)
        entry.untold.setdefault(heir.id, set()).update(left)
        self.metrics.source_share_pieces.labels("handed_on").inc(len(left))
        logger.info(
            "task {}: {} pieces of {}'s source share go to {} ({})",
            entry.task.id[:12],
            len(left),
            peer.id,
            heir.id,
            why,
        )
        if heir.id in entry.answered:
            queue = entry.sharers[heir.id]
            queue.put_nowait(self._offer(entry, heir, [], []))

    def _orphans(self, entry: TaskEntry, peer: Peer) -> set[int]:
        """The pieces ``peer`` holds that no other peer of the task holds or is to read."""
        held = self.held(entry, but=peer)
        for pid, share in entry.shares.items():
            if pid != peer.id:
                held |= share
        return peer.finished_pieces - held

    def _source_busy(self, entry: TaskEntry, peer: Peer) -> bool:
        """Someone (a seed or another peer) is fetching what ``peer`` needs from the source."""
        st = self.state
        wanted = st.range_of(peer.id)
        for pid in entry.task.peer_ids:
            p = st.peers.get(pid)
            if p is None or p.id == peer.id or p.id in peer.blocklist:
                continue  # a peer this one will not take pieces from is nothing to wait for
            if not covers(st.range_of(p.id), wanted, _layout(entry)):
                continue
            # Fetching from the source now: wait for its pieces. (A peer that has finished and
            # is still no candidate, on this host, say, will not become one by waiting.)
            if p.state is PeerState.BACK_TO_SOURCE or (p.need_back_to_source and not p.done):
                return True
        return self._seed_covers(entry, wanted)

    @staticmethod
    def _seed_covers(entry: TaskEntry, wanted: ByteRange | None) -> bool:
        """The seed has been asked for (at least) ``wanted`` and has not failed since."""
        if not entry.seed_triggered_at or entry.seed_failed_at >= entry.seed_triggered_at:
            return False
        return any(covers(asked, wanted, _layout(entry)) for asked in entry.seed_requests)

    def source_rank(self, entry: TaskEntry, peer: Peer, number: int, share: set[int] | None) -> int:
        """Whose report of piece ``number`` read from the source ``peer``'s is (NOT_SENT,
        SENT_PEER, SEED): a seed host's peer; a peer the scheduler sent to the source or handed
        the piece in a share; anybody else, whose digests are not taken."""
        h = self.state.hosts.get(peer.host_id)
        if h is not None and h.type is not _NORMAL_HOST:
            return SEED
        if peer.id in entry.source_readers or (share is not None and number in share):
            return SENT_PEER
        return NOT_SENT

    def source_piece(self, entry: TaskEntry, peer: Peer, piece: common_pb2.Piece, share: set[int] | None) -> None:
        """A piece ``peer`` says it read from the source: its digest becomes the task's
        authoritative one only from a peer the scheduler sent there, well formed, and where the
        task's layout puts the piece. Others are ignored (logged once per peer)."""
        rank = self.source_rank(entry, peer, piece.number, share)
        why = ""
        if rank == NOT_SENT:
            why = "the scheduler did not send it to the source"
        elif piece.digest and not valid_piece_digest(piece.digest):
            why = f"digest {piece.digest[:80]!r} is not crc32:N, sha256:HEX or blake3:HEX"
        elif entry.task.known_length:
            try:
                span = entry.task.layout.span(piece.number)
            except InvalidArgument as exc:
                span, why = None, str(exc)
            if span is not None and (piece.offset, piece.length) != (span.offset, span.length):
                why = f"piece {piece.number} is not at {piece.offset}+{piece.length} in the task's layout"
        if why:
            self.refused["digest"].inc()
            if peer.id not in entry.ignored_reporters:
                entry.ignored_reporters.add(peer.id)
                logger.warning("task {}: source piece reports of peer {} ignored: {}", entry.task.id[:12], peer.id, why)
            return
        entry.record_piece(piece, rank)

    def _back_to_source(self, entry: TaskEntry, peer: Peer, why: str) -> scheduler_pb2.AnnouncePeerResponse:
        entry.back_to_source_peers.add(peer.id)
        entry.source_readers.add(peer.id)  # sent to the source: its piece reports set the digests
        peer.need_back_to_source = True
        self.schedules["back_to_source"].inc()
        logger.info("peer {} of task {} goes back to source: {}", peer.id, peer.task_id[:12], why)
        return scheduler_pb2.AnnouncePeerResponse(
            need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse(description=why)
        )

    def _trigger_seed(self, entry: TaskEntry, peer: Peer, request: common_pb2.Download | None = None) -> Host | None:
        """Ask the task's seed to fetch it from the source; None when no seed can.

        The seed gets the request as the scheduler keeps it, without credentials. Only over
        mutual TLS does it get the requester's own ``request``, credentials included, for this
        one call (they are kept nowhere). Without TLS a private source refuses the seed, and the
        requester is sent to read the source itself. A request that names its task with a
        ``content_for_calculating_task_id`` its URL does not imply (a local client's choice) is
        no seed's to fill: a seed would store that URL's bytes under any id a peer names (a
        damselfly seed refuses it, ``admission.check_task_key``; an upstream one would not)."""
        if not self.cfg.seed_trigger:
            return None
        kept = self.state.downloads.get(peer.id)
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
        if self._seed_covers(entry, wanted):
            return seed  # already under way
        entry.seed_requests.append(wanted)
        entry.seed_triggered_at = time.time()
        self.metrics.seed_triggers.inc()
        download = common_pb2.Download()
        if request is not None and self.tls:
            download.CopyFrom(request)
        else:
            download.CopyFrom(self.state.downloads.get(peer.id) or common_pb2.Download(url=entry.task.url))
        download.need_back_to_source = True
        download.output_path = ""
        self._spawn(self._run_seed(seed, entry, download))
        return seed

    async def _run_seed(self, seed: Host, entry: TaskEntry, download: common_pb2.Download) -> None:
        addr = f"{seed.ip}:{seed.port}"
        logger.info("triggering seed {} for task {}", seed.id, entry.task.id[:12])
        try:
            async with preheat.channel_to(addr, self.settings) as channel:
                stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
                call = stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download))
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as exc:
            entry.seed_failed_at = time.time()
            self.metrics.seed_trigger_failures.inc()
            logger.warning("seed {} failed task {}: {}", seed.id, entry.task.id[:12], exc.details())
            entry.notify()


class _PeerSession:
    """One AnnouncePeer stream: the requests of one peer, answered through ``out``."""

    def __init__(
        self, svc: SchedulerService, out: Outbox | StreamOut, *, shares_ok: bool = False, context: object = None
    ):
        self.svc = svc
        self.st = svc.state
        self.out = out
        self.shares_ok = shares_ok  # the peer said it may take a share of the source read
        self.context = context  # the call's, for the caller's certificate
        self.peer: Peer | None = None
        # the peer's request as it sent it, while it has credentials the scheduler does not keep:
        # it lives with the stream (the request), for the seed trigger over TLS
        self.request: common_pb2.Download | None = None
        self.scheduling: asyncio.Task[None] | None = None
        self.input_done = False  # the requests ended, or one ended the stream

    def close(self) -> None:
        if self.scheduling:
            self.scheduling.cancel()
        self._stop_refresh()
        p = self.peer
        if p is not None and self.st.peers.get(p.id) is p and not p.done:  # (not one registered again since)
            # The stream broke before the peer said it finished: it is gone.
            entry = self.st.tasks.get(p.task_id)
            if entry is not None:
                self.svc.hand_on_shares(entry, p, "its stream ended", gone=True)
            p.state = PeerState.LEAVE
            self.st.remove_peer(p.id)
            self.svc._refresh_gauges()

    def _schedule_soon(self) -> None:
        """Schedule the peer: at once when a parent or the source can be named now (most
        decisions), in a task that waits for the seed or a parent otherwise."""
        peer = self.peer
        assert peer is not None
        if self.scheduling and not self.scheduling.done():
            return
        peer.schedule_count += 1
        try:
            answer = self.svc.schedule_now(peer, time.monotonic(), self.request)
        except ScheduleError as exc:
            self.out.put_nowait(exc)
            return
        if answer is None:
            self.scheduling = asyncio.get_running_loop().create_task(self._schedule(peer))
        else:
            self._answer(peer, answer)

    async def _schedule(self, peer: Peer) -> None:
        try:
            answer = await self.svc.schedule(peer, self.request)
        except ScheduleError as exc:
            self.out.put_nowait(exc)
            return
        self._answer(peer, answer)

    def _answer(self, peer: Peer, answer: Answer) -> None:
        self.out.put_nowait(answer)
        if type(answer) is Encoded or answer.WhichOneof("response") == "normal_task_response":  # type: ignore[union-attr]
            self._start_refresh(peer)

    def _start_refresh(self, peer: Peer) -> None:
        self.svc.start_refresh(self.st.tasks[peer.task_id], peer, self.out)

    def _stop_refresh(self) -> None:
        p = self.peer
        entry = self.st.tasks.get(p.task_id) if p is not None else None
        if p is not None and entry is not None:
            self.svc.stop_refresh(entry, p)

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
                self.out.put_nowait(_CLOSE)
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
            self.out.put_nowait(_CLOSE)

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
                self.svc.reports["back_to_source"].inc()
                share = entry.shares.get(peer.id)
                self.svc.source_piece(entry, peer, piece, share)
                if share is not None:
                    share.discard(piece.number)
                    if not share:
                        del entry.shares[peer.id]
            else:
                self.svc.reports["remote_peer"].inc()
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
            self.svc.hand_on_shares(entry, peer, "it could not read the source")
        elif kind == "reschedule_peer_request":
            r = req.reschedule_peer_request
            for c in r.candidate_parents:
                peer.blocklist.add(c.id)
                peer.parents.discard(c.id)
            logger.info("peer {} asks to be rescheduled: {}", peer.id, r.description)
            self._stop_refresh()
            if peer.schedule_count > self.svc.settings.daemon.schedule_retries + 1:
                self.out.put_nowait(self.svc._back_to_source(entry, peer, "max schedule count exceeded"))
            else:
                self._schedule_soon()
        elif kind in ("download_peer_finished_request", "download_peer_back_to_source_finished_request"):
            self.svc.hand_on_shares(entry, peer, "it finished")  # nothing is left of a share by then
            peer.state = PeerState.SUCCEEDED
            if self.st.range_of(peer.id) is None:
                entry.task.state = TaskState.SUCCEEDED  # a ranged peer finishing says nothing of the rest
            entry.notify()
            return True
        elif kind in ("download_peer_failed_request", "download_peer_back_to_source_failed_request"):
            self.svc.hand_on_shares(entry, peer, "it failed")
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
        svc = self.svc
        if svc.tls:
            svc.check_owner(svc.identity(self.context), host.id, "AnnouncePeer")
        svc.check_task_id(req.task_id, download)
        limits = svc.limits
        if req.task_id not in self.st.tasks and len(self.st.tasks) >= limits.max_tasks:
            raise svc.over_limit("tasks", limits.max_tasks)
        if req.peer_id not in self.st.peers and len(self.st.peers) >= limits.max_peers:
            raise svc.over_limit("peers", limits.max_peers)
        # Credentials stay with the request (this stream): the scheduler keeps and shows the
        # request without them, stripped once here.
        if has_secrets(download):
            self.request = download
            download = strip_secrets(download)
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
        self.st.set_download(peer.id, download)
        host.peer_ids.add(peer.id)
        task.peer_ids.add(peer.id)
        self.peer = peer
        self.svc._refresh_gauges()
        if (
            self.shares_ok
            and self.svc.cfg.source_shares
            and not self.st.strategy.dag  # in a DAG no piece flows up to a parent: a block would reach few
            and self.st.range_of(peer.id) is None
            and not download.disable_back_to_source
            and not download.metadata_only
        ):
            entry.sharers[peer.id] = self.out
        if download.metadata_only:
            # A daemon that already holds the whole task says so (after a restart, say).
            peer.state = PeerState.RUNNING
            self.out.put_nowait(
                scheduler_pb2.AnnouncePeerResponse(metadata_only_response=scheduler_pb2.MetadataOnlyResponse())
            )
            return
        if download.need_back_to_source:
            if host.is_seed and peer.id in entry.sharers and not entry.shares_planned:
                self.scheduling = asyncio.get_running_loop().create_task(self._share_or_read(entry, peer))
                return
            self.out.put_nowait(self.svc._back_to_source(entry, peer, "the peer asked for it"))
            return
        self._schedule_soon()

    async def _share_or_read(self, entry: TaskEntry, seed: Peer) -> None:
        """The seed of a new task: after ``source_share_wait`` (the peers that started the task
        with the first one register meanwhile), a block to read and the rest from the peers, or
        the whole task from the source when there is nobody to share with."""
        await asyncio.sleep(self.svc.cfg.source_share_wait)
        if seed.id not in self.st.peers or seed.done:
            return
        if entry.task.known_length and entry.task.piece_count and not self.svc.unheld(entry):
            # every piece is held by a peer already: the seed fetches them like any peer
            entry.shares_planned = True
            seed.need_back_to_source = False
            self._schedule_soon()
            return
        shared = self.svc.plan_shares(entry, seed)
        if shared is None:
            self.out.put_nowait(self.svc._back_to_source(entry, seed, "the peer asked for it"))
            return
        self.out.put_nowait(shared)
        self._start_refresh(seed)


async def start_scheduler(settings: Settings, plugins: Plugins | None = None) -> SchedulerServer:
    plugins = plugins or build_plugins(settings)
    metrics = SchedulerMetrics()
    service = SchedulerService(settings, plugins, metrics)
    cfg = settings.scheduler
    tls_cfg = settings.security.tls
    server: grpc.aio.Server | h2grpc.Server
    if cfg.grpc_server == "native":
        server = h2grpc.Server(max_streams=settings.security.limits.grpc_max_streams)
    else:  # (with TLS, an interceptor checks each caller's certificate names its address)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=tls.server_interceptors(tls_cfg))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # mutual TLS when security.tls is set: every caller shows a certificate of the cluster CA
    port = tls.add_port(server, _address(cfg.listen_ip, cfg.port), tls_cfg)
    if port == 0:
        raise OSError(f"cannot bind the scheduler to {cfg.listen_ip}:{cfg.port}")
    tls.warn_unauthenticated("the scheduler", cfg.listen_ip, tls_cfg)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    runner, metrics_port = await serve_metrics(metrics.registry, cfg.listen_ip, cfg.metrics_port)
    gc = asyncio.get_running_loop().create_task(service.gc())
    service._spawn(service.refresh_periodically())
    logger.info("scheduler serving on {}:{} (metrics :{})", cfg.listen_ip, port, metrics_port)
    return SchedulerServer(server, service, runner, gc, f"{cfg.listen_ip}:{port}", metrics_port)


def _address(ip: str, port: int) -> str:
    """host:port, an IPv6 address in brackets."""
    try:
        return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"
    except ValueError:
        return f"{ip}:{port}"


@dataclass
class SchedulerServer:
    server: grpc.aio.Server | h2grpc.Server
    service: SchedulerService
    metrics_runner: object
    gc: asyncio.Task[None]
    address: str
    metrics_port: int

    async def stop(self, grace: float = 1.0) -> None:
        self.gc.cancel()
        for t in list(self.service._background):
            t.cancel()
        await self.server.stop(grace)
        await self.metrics_runner.cleanup()  # type: ignore[attr-defined]
