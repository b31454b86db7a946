"""Which piece to fetch from which parent, and when: the piece-choice policy of a download, sans-IO.

The fetch loop tells the ``Planner`` what happens (a parent reports a piece, says it is busy,
declines a piece, fails; a fetch ends) and asks it, each pass, for the fetches to start. Time
comes in as ``now`` and randomness from an injected ``random.Random``; nothing here awaits,
reads a clock or touches the network.

The policy. A download has ``concurrent_pieces`` ordinary fetch slots and
``seed_extra_pieces`` that only fetches from a seed may take (``fetch_slots``). The piece
picker orders the pieces parents hold; a piece goes to a holder not backing off (busy, or
it declined that piece) and not yet asked for it, the least loaded of them, then at random
weighted by free upload bandwidth. A piece first reported a moment ago waits up to
``parent_gather_window`` for the other parents to report it too. Once every missing piece
is in flight (the endgame), the ones in flight longest are fetched once more from another
holder; the first copy in wins.

Stalls. A fetch that moved no bytes for ``stall_timeout`` is stalled: cancelled, its parent
not asked for that piece again for as long (another holder is). A download whose pieces
moved no bytes for ``stall_timeout``, with no fetch left in flight and a parent holding a
missing piece, first asks the scheduler for other parents
(``Stall.RESCHEDULE``); still none after another period, it gives up (``Stall.FAIL``) with a
reason that names the pieces it waited for, from whom, and for how long.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from damselfly.config import DaemonConfig
    from damselfly.contracts import PiecePicker

# A seed counts as half a holder for the piece pickers: a piece only a seed holds is the
# rarest there is (the seed's link is the one way new pieces enter the swarm).
SEED_HOLDER = 0.5
DECLINED_BACKOFF = 1.0  # seconds before a parent that declined a piece is asked for it again
NEXT_PASS = 1.0  # seconds the fetch loop waits at most before it plans again

_NOBODY: frozenset[str] = frozenset()


@dataclass
class Parent:
    """One parent of a download, as far as piece choice goes, and the addresses it is reached at."""

    peer_id: str
    ip: str = ""
    upload_port: int = 0
    host_id: str = ""
    piece_addresses: dict[str, str] = field(default_factory=dict)  # transport name -> address
    weight: float = 1.0
    alive: bool = True
    synced: bool = False  # its SyncPieces stream ended normally
    is_seed: bool = False
    busy_until: float = 0.0  # it said its upload slots were taken: not asked again before then
    declined: dict[int, float] = field(default_factory=dict)  # piece -> not asked for it again before then
    pieces: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True, eq=False)
class Fetch:
    """One fetch in flight: its piece, its parent, whether it counts as a seed's extra, when it began,
    and whether it is an endgame copy (staged aside until it wins)."""

    number: int
    parent_id: str
    from_seed: bool
    started: float
    staged: bool = False


class Outcome(enum.Enum):
    """How a fetch ended, as the planner needs to know it."""

    STORED = "stored"  # the piece is in (or, staged, verified and about to be landed)
    CANCELLED = "cancelled"  # an endgame loser, or the download ending
    BUSY = "busy"  # the parent's upload slots were taken
    DECLINED = "declined"  # the parent would not serve it now
    FAILED = "failed"  # anything else
    STALLED = "stalled"  # it moved no bytes for stall_timeout: cancelled, another holder asked


class Stall(enum.Enum):
    """What a download with no progress does next."""

    NONE = "none"  # progress within stall_timeout, or waiting out the period after a reschedule
    RESCHEDULE = "reschedule"  # ask the scheduler for other parents
    FAIL = "fail"  # still nothing after the reschedule: stop, saying what it waited for


@dataclass(frozen=True, slots=True)
class Plan:
    """One pass's decisions: the fetches to start, how long to wait at most before the next pass,
    whether every slot is full (then only a fetch ending can change anything), and why the
    download cannot go on with these parents (None while it can)."""

    starts: list[Fetch]
    wait: float
    full: bool
    give_up: str | None = None


def parent_weight(max_tx_bandwidth: int, tx_bandwidth: int) -> float:
    """Free upload bandwidth, the weight of a parent in per-piece choice."""
    return float(max(max_tx_bandwidth - tx_bandwidth, 1))


def holding(p: Parent) -> float:
    """What a parent counts for in a piece's rarity: a seed half a holder (it offers its
    pieces to all), a peer one."""
    return SEED_HOLDER if p.is_seed else 1


def holders(parents: Iterable[Parent]) -> dict[int, float]:
    """How many of ``parents`` hold each piece, a seed counting ``SEED_HOLDER``."""
    held: dict[int, float] = {}
    for p in parents:
        w = holding(p)
        for n in p.pieces:
            held[n] = held.get(n, 0) + w
    return held


class Planner:
    """The piece-choice state of one download: its parents, its fetches in flight, who was asked for what.

    ``blocklist`` (parents that sent a bad piece) and the time each piece was first reported
    outlive a round of parents; ``new_round`` forgets the rest when the scheduler hands over
    a new set."""

    def __init__(self, cfg: DaemonConfig, picker: PiecePicker, rng: random.Random | None = None):
        self.cfg = cfg
        self.picker = picker
        self.rng = rng or random.Random()
        self.blocklist: set[str] = set()
        self.first_seen: dict[int, float] = {}  # when a parent first reported each piece
        self.parents: dict[str, Parent] = {}
        self.fetches: list[Fetch] = []
        self.load: dict[str, int] = {}  # pieces in flight from each parent
        self.tried: dict[int, set[str]] = {}  # parents asked for each piece, not to be asked again
        # holders of each piece among the usable parents (a seed counting SEED_HOLDER), kept up
        # to date as they report pieces; None when a parent went away and it must be rebuilt
        self._held: dict[int, float] | None = None
        # stall detection, across rounds: when bytes last moved, and when a stall asked for other parents
        self.progress_at: float | None = None
        self.stall_rescheduled_at: float | None = None

    def new_round(self) -> None:
        """A new set of parents: nothing is in flight, nobody has been asked for anything."""
        self.parents = {}
        self.fetches = []
        self.load = {}
        self.tried = {}
        self._held = None

    # -- what happens ------------------------------------------------------------------------

    def add(self, parent: Parent) -> bool:
        """Take on ``parent``; False when it is known already or blocklisted."""
        if parent.peer_id in self.parents or parent.peer_id in self.blocklist:
            return False
        self.parents[parent.peer_id] = parent
        return True

    def reported(self, parent: Parent, number: int, now: float) -> None:
        """``parent`` says it holds piece ``number``."""
        if number not in parent.pieces:
            parent.pieces.add(number)
            if self._held is not None and parent.alive and parent.peer_id not in self.blocklist:
                self._held[number] = self._held.get(number, 0) + holding(parent)
        self.first_seen.setdefault(number, now)

    def busy(self, parent: Parent, now: float) -> None:
        """``parent``'s upload slots were taken: not asked again for ``busy_backoff``, or until a fetch
        from it ends."""
        parent.busy_until = now + self.cfg.busy_backoff

    def declined(self, parent: Parent, number: int, now: float) -> None:
        """``parent`` would not serve ``number`` now: another is asked, or it again later."""
        parent.declined[number] = now + DECLINED_BACKOFF

    def lacks(self, parent: Parent, number: int) -> None:
        """``parent`` does not have ``number`` after all."""
        parent.pieces.discard(number)
        self._held = None

    def failed(self, parent: Parent) -> None:
        """``parent`` went away: it is asked for nothing more."""
        parent.alive = False
        self._held = None

    def block(self, peer_id: str) -> None:
        """``peer_id`` sent a bad piece: never asked again by this download."""
        self.blocklist.add(peer_id)
        self._held = None

    def ended(self, fetch: Fetch, outcome: Outcome, now: float = 0.0) -> None:
        """``fetch`` is over (``now`` matters to a stalled one)."""
        self.fetches.remove(fetch)
        self.load[fetch.parent_id] -= 1
        parent = self.parents.get(fetch.parent_id)
        if parent is not None and outcome not in (Outcome.BUSY, Outcome.STALLED):
            # our fetch from it ended, so one of its upload slots is free: a parent that
            # answered busy is asked again now, not busy_backoff later (on a fast link
            # a piece takes milliseconds, and a fixed pause idled it most of the time)
            parent.busy_until = 0.0
        if outcome is Outcome.STALLED and parent is not None:
            # not asked for this piece again for a stall period, nor for anything for busy_backoff
            parent.declined[fetch.number] = now + self.cfg.stall_timeout
            parent.busy_until = now + self.cfg.busy_backoff
        if outcome in (Outcome.BUSY, Outcome.DECLINED, Outcome.STALLED):
            self.tried.get(fetch.number, set()).discard(fetch.parent_id)  # asked again once it has a slot
        elif outcome is Outcome.STORED:
            self.tried.pop(fetch.number, None)

    def progressed(self, now: float) -> None:
        """Bytes moved (into a piece, or a share of the source being read): the download is not stalled."""
        if self.progress_at is None or now > self.progress_at:
            self.progress_at = now
        self.stall_rescheduled_at = None

    def stall(self, now: float, missing: Set[int]) -> Stall:
        """Whether the download has stalled, and what it does about it (a RESCHEDULE is remembered).

        Not while a fetch is in flight: a fetch that moves no bytes ends itself at stall_timeout
        and its piece goes to another holder, so the download gives up on its parents only once
        none is left to ask. While no parent holds a missing piece (a seed still reading the
        source), nothing has stalled: the scheduler is asked again each schedule_timeout."""
        if self.progress_at is None:
            self.progress_at = now  # the clock starts with the first pass
        cfg = self.cfg
        idle = now - self.progress_at
        if self.fetches or idle < min(cfg.stall_timeout, cfg.schedule_timeout):
            return Stall.NONE
        if not any(n in p.pieces for p in self.usable() for n in missing):
            if idle < cfg.schedule_timeout:
                return Stall.NONE
            self.progress_at = now  # the next parents get a period of their own
            return Stall.RESCHEDULE
        if idle < cfg.stall_timeout:
            return Stall.NONE
        if self.stall_rescheduled_at is None:
            self.stall_rescheduled_at = now
            return Stall.RESCHEDULE
        return Stall.FAIL if now - self.stall_rescheduled_at >= cfg.stall_timeout else Stall.NONE

    def stall_reason(self, missing: set[int], now: float) -> str:
        """One line: how long nothing moved, which pieces were awaited and from whom."""
        idle = now - (self.progress_at if self.progress_at is not None else now)
        waited: dict[str, list[int]] = {}
        for f in self.fetches:
            waited.setdefault(f.parent_id, []).append(f.number)
        for n in sorted(missing):
            for p in self.parents.values():
                if n in p.pieces and n not in waited.get(p.peer_id, ()):
                    waited.setdefault(p.peer_id, []).append(n)
        parts = [f"pieces {_numbers(ns)} from {pid}" for pid, ns in sorted(waited.items())]
        unheld = sorted(n for n in missing if not any(n in p.pieces for p in self.parents.values()))
        if unheld:
            parts.append(f"pieces {_numbers(unheld)} that no parent holds")
        return f"no piece data moved for {idle:.0f}s; waited for " + "; ".join(parts or ["parents to report pieces"])

    def others(self, fetch: Fetch) -> list[Fetch]:
        """The other fetches in flight of ``fetch``'s piece: they lose once it is in."""
        return [f for f in self.fetches if f.number == fetch.number and f is not fetch]

    # -- what to do --------------------------------------------------------------------------

    def usable(self) -> list[Parent]:
        """Parents alive and not blocklisted."""
        return [p for p in self.parents.values() if p.alive and p.peer_id not in self.blocklist]

    def slots(self, *, sharing: bool) -> tuple[bool, bool]:
        """(ordinary slots full, every slot full) with the fetches in flight now."""
        from_seeds = sum(f.from_seed for f in self.fetches)
        return fetch_slots(len(self.fetches), from_seeds, self.cfg, sharing=sharing)

    def _start(self, parent: Parent, number: int, now: float, *, staged: bool = False) -> Fetch:
        # an endgame copy counts against concurrent_pieces, whoever serves it
        fetch = Fetch(number, parent.peer_id, parent.is_seed and not staged, now, staged)
        self.fetches.append(fetch)
        self.load[parent.peer_id] = self.load.get(parent.peer_id, 0) + 1
        return fetch

    def plan(self, missing: set[int], now: float, *, sharing: bool, source_instead: Set[int] = frozenset()) -> Plan:
        """The fetches to start now for the ``missing`` pieces (``source_instead``: read from the
        source, not fetched; ``sharing``: a share of the source read is being read here)."""
        cfg = self.cfg
        starts: list[Fetch] = []
        next_ready = NEXT_PASS
        peers_full, full = self.slots(sharing=sharing)
        usable = self.usable()
        later: list[float] = []
        if not full:  # else only a fetch ending can let another start: nothing to choose
            # parents that said "busy", or declined a piece, are asked again at these times
            later = [p.busy_until for p in usable if p.busy_until > now]
            later += [t for p in usable for n, t in p.declined.items() if t > now and n in missing]
            if later:
                next_ready = min(next_ready, min(later) - now)
            if peers_full:
                choosable = [p for p in usable if p.is_seed]
                held_by = holders(choosable)
            else:
                choosable = usable
                if self._held is None:  # kept up to date as parents report pieces
                    self._held = holders(usable)
                held_by = self._held
            fetching = {f.number for f in self.fetches}
            wanted = (held_by.keys() & missing) - fetching - source_instead
            # Only parents not backing off can be asked, so only their pieces are walked:
            # with every parent busy a pass costs next to nothing.
            ready = [p for p in choosable if p.busy_until <= now]
            reachable = wanted
            if len(ready) < len(choosable):
                reachable = wanted & set().union(*(p.pieces for p in ready))
            for number in self.picker.order(reachable, held_by) if ready else ():
                peers_full, full = self.slots(sharing=sharing)
                if full:
                    break
                asked = self.tried.get(number, _NOBODY)
                those = [
                    p
                    for p in ready
                    if number in p.pieces
                    and p.declined.get(number, 0.0) <= now
                    and p.peer_id not in asked
                    and (p.is_seed or not peers_full)
                ]
                if not those:
                    continue
                # Upstream's gather window: give the other parents a moment to report the
                # piece too, so the choice below is among all who have it, not the fastest.
                age = now - self.first_seen.get(number, now)
                if age < cfg.parent_gather_window and any(not p.synced and number not in p.pieces for p in usable):
                    next_ready = min(next_ready, cfg.parent_gather_window - age)
                    continue
                # the least busy of them (pieces we are fetching from it), then by free upload
                fewest = min(self.load.get(p.peer_id, 0) for p in those)
                those = [p for p in those if self.load.get(p.peer_id, 0) == fewest]
                parent = self.rng.choices(those, weights=[max(p.weight, 1e-9) for p in those])[0]
                self.tried.setdefault(number, set()).add(parent.peer_id)
                starts.append(self._start(parent, number, now))
            peers_full, full = self.slots(sharing=sharing)
            if cfg.endgame_duplicates and not peers_full and endgame(missing, self.fetches):
                # Endgame: every missing piece is being fetched, and slots are free. The
                # pieces in flight longest get one more fetch each, from another holder,
                # into a staged writer; the first copy in wins, the rest are cancelled.
                for number in endgame_order(list(self.fetches), cfg.endgame_duplicates):
                    if self.slots(sharing=sharing)[0]:
                        break
                    asked = {f.parent_id for f in self.fetches if f.number == number}
                    those = [p for p in usable if _askable(p, number, now) and p.peer_id not in asked]
                    if those:
                        parent = min(those, key=lambda p: (self.load.get(p.peer_id, 0), self.rng.random()))
                        starts.append(self._start(parent, number, now, staged=True))
                peers_full, full = self.slots(sharing=sharing)
        give_up = None
        if not self.fetches and not sharing:  # a share being read is progress too
            # (a seed whose share came with no parent waits for the scheduler's offers)
            if self.parents and all(p.synced for p in usable) and not later:
                give_up = (
                    f"{len(missing)} pieces missing and no live parent has them "
                    f"({len(self.parents) - len(usable)} of {len(self.parents)} parents failed)"
                )
            else:
                for n in missing:  # a parent still syncing may offer a piece again later
                    self.tried.pop(n, None)
        return Plan(starts, next_ready, full, give_up)


def _numbers(numbers: list[int], shown: int = 8) -> str:
    """Piece numbers for a one-line message: the first few, then how many more."""
    ns = sorted(numbers)
    text = ",".join(map(str, ns[:shown]))
    return f"{text} (+{len(ns) - shown} more)" if len(ns) > shown else text


def fetch_stalled(last_moved: float, now: float, stall_timeout: float) -> bool:
    """Whether a fetch whose bytes last moved at ``last_moved`` (its start, before any) has stalled."""
    return now - last_moved >= stall_timeout


def _askable(p: Parent, number: int, now: float) -> bool:
    return number in p.pieces and p.busy_until <= now and p.declined.get(number, 0.0) <= now


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


def endgame(missing: set[int], fetches: Iterable[Fetch]) -> bool:
    """Whether a download is in its endgame: every piece it misses is in flight.

    Not before: while a missing piece is held by no parent yet (mid-download, the swarm
    short of pieces), a second fetch of a piece in flight moves the same bytes twice, and
    the loser's cancelled connection has to be opened again; that cost the daemons a third
    more piece transfers in a loopback swarm.
    """
    return missing <= {f.number for f in fetches}


def endgame_order(fetches: list[Fetch], duplicates: int) -> list[int]:
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
