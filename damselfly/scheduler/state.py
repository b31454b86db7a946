"""The scheduler's state: hosts, tasks and peers, and which peers can serve a peer now.

Plain logic on ``core`` objects, no protobuf and no gRPC: what a peer registered with is
kept as its byte range (the request itself stays with its stream), and the answers'
encodings are kept by ``answers``. Candidates are drawn here and ranked by the strategy.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger

from damselfly.config import Settings
from damselfly.contracts import Candidate, Strategy
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.core.piece import ByteRange, Layout, covers
from damselfly.core.task import PieceRecord, Task

# Who may set a piece's authoritative digest: nobody the scheduler did not send to the source;
# a peer it sent there (told to go back to source, or handed a share of the read); a seed
# host's peer, whose digest wins over a peer's (a peer can always get itself sent to the source).
NOT_SENT, SENT_PEER, SEED = 0, 1, 2

_NORMAL_HOST = HostType.NORMAL  # h.type is _NORMAL_HOST: not h.is_seed, without the property
_new, _set_peer, _set_host = object.__new__, Candidate.peer.__set__, Candidate.host.__set__  # type: ignore[attr-defined]


class AnswerSink(Protocol):
    """Where a peer's answers go: its stream (``session.Outbox``, ``session.StreamOut``)."""

    def put_nowait(self, item: object) -> None: ...


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
    sharers: dict[str, AnswerSink] = field(default_factory=dict)
    shares: dict[str, set[int]] = field(default_factory=dict)
    untold: dict[str, set[int]] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    shares_planned: bool = False
    share_serial: int = 0
    # counts the changes of task.pieces (record_piece is the only way a piece enters the
    # scheduler's task): whoever keeps something made of the pieces compares it
    pieces_version: int = 0
    # the downloading peers offered more parents as they appear (Scheduling.refresh_peer),
    # with their answer queues; told of every change through on_change
    refreshers: dict[str, tuple[Peer, AnswerSink]] = field(default_factory=dict)
    on_change: Callable[[TaskEntry], None] | None = None

    def record_piece(self, piece: PieceRecord, rank: int = SEED) -> bool:
        """Keep a piece as the one who read it from the source reported it, its digest the
        authoritative one for children to check the piece against. A digest once set is kept
        against a different one from an authority of the same rank (a conflict, logged); a
        seed's replaces a peer's. False when nothing changed."""
        n = piece.number
        old = self.task.pieces.get(n)
        if old is not None and old.digest:
            if old.digest == piece.digest or not piece.digest:
                return False
            kept_rank = self.digest_rank.get(n, SEED)
            if rank <= kept_rank:
                logger.warning(
                    "task {} piece {}: digest {} conflicts with {}; the first is kept",
                    self.task.id[:12], n, piece.digest, old.digest,
                )  # fmt: skip
                return False
            logger.warning(
                "task {} piece {}: a seed's digest {} replaces {}", self.task.id[:12], n, piece.digest, old.digest
            )
        elif piece.digest:
            self.digested += 1
        self.task.pieces[n] = piece
        if piece.digest:
            self.digest_rank[n] = rank
        self.pieces_version += 1
        return True

    @property
    def digests_complete(self) -> bool:
        """The scheduler holds an authoritative digest for every piece of the task."""
        t = self.task
        if not t.known_length or self.digested < t.piece_count:
            return False  # (the count may include numbers reported before the length was known)
        count = t.piece_count
        return sum(1 for n in self.digest_rank if n < count) >= count

    def notify(self) -> None:
        self.changed.fire()
        if self.refreshers and self.on_change is not None:
            self.on_change(self)

    @property
    def layout(self) -> Layout | None:
        """The task's piece layout once its length is known: ranges are then compared piece by piece."""
        return self.task.layout if self.task.known_length else None

    def refreshing(self, peer: Peer) -> bool:
        """``peer`` itself is among the task's refreshers (not a peer registered again under its id)."""
        r = self.refreshers.get(peer.id)
        return r is not None and r[0] is peer


class SchedulerState:
    """Hosts, tasks and peers; every method is plain logic on this state."""

    def __init__(self, settings: Settings, strategy: Strategy):
        self.settings = settings
        self.cfg = settings.scheduler
        self.strategy = strategy
        self.hosts: dict[str, Host] = {}
        self.tasks: dict[str, TaskEntry] = {}
        self.peers: dict[str, Peer] = {}
        self.ranges: dict[str, ByteRange] = {}  # the byte range of each peer that registered for one
        self.on_task_change: Callable[[TaskEntry], None] | None = None  # each new task's on_change

    def entry(self, task_id: str) -> TaskEntry:
        e = self.tasks.get(task_id)
        if e is None:
            now = time.time()
            e = self.tasks[task_id] = TaskEntry(Task(id=task_id, created_at=now, updated_at=now))
            e.on_change = self.on_task_change
        return e

    def range_of(self, peer_id: str) -> ByteRange | None:
        """The byte range a peer downloads (None: the whole task)."""
        return self.ranges.get(peer_id)

    def set_range(self, peer_id: str, byte_range: ByteRange | None) -> None:
        """What ``peer_id`` registered for: ``byte_range`` (None, or no length: the whole task)."""
        if byte_range is not None and byte_range[1] > 0:
            self.ranges[peer_id] = byte_range
        else:
            self.ranges.pop(peer_id, None)

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
        if not self.ranges:
            return None, None  # no peer is ranged, this one neither
        return self.range_of(child.id), entry.layout

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
        own_host, ranged = child.host_id, self.ranges
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
            if ranged and not covers(ranged.get(pid), child_range, layout):
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

    def remove_peer(self, peer_id: str) -> None:
        p = self.peers.pop(peer_id, None)
        self.ranges.pop(peer_id, None)
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
        h = self.hosts.pop(host_id, None)
        if h:
            for pid in list(h.peer_ids):
                self.remove_peer(pid)

    def collect(self, now: float) -> None:
        """Forget silent hosts (and their peers), peers past their TTL, and tasks with no peer.

        A finished peer has no TTL: it stays while its host keeps announcing (a daemon that
        drops a task says so with DeleteTask) and goes with its host."""
        for h in [h for h in self.hosts.values() if h.expired(now)]:
            logger.info("host {} went silent; forgetting it and its peers", h.id)
            self.remove_host(h.id)
        for p in [p for p in self.peers.values() if now - p.updated_at > self.cfg.peer_ttl]:
            if p.state is not PeerState.SUCCEEDED or p.host_id not in self.hosts:
                self.remove_peer(p.id)
        for task_id in [t for t, e in self.tasks.items() if not e.task.peer_ids and now - e.task.updated_at > 60]:
            del self.tasks[task_id]
