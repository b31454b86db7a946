"""``dragonfly``: Dragonfly's evaluator, scored the way upstream's scheduler scores.

score = 0.6 load quality + 0.2 IDC affinity + 0.1 location affinity + 0.1 host type
load quality = 0.5 free peak bandwidth + 0.3 bandwidth duration + 0.2 concurrency
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

from damselfly.contracts import Candidate, Registry, Strategy
from damselfly.core.host import Host, HostType
from damselfly.core.peer import PeerState
from damselfly.core.task import Task
from damselfly.hookspecs import hookimpl

LOCATION_LEVELS = 5
DURATION_WINDOW = 60.0  # seconds
REFERENCE_PIECE = 16 * 1024 * 1024


def load_quality(h: Host) -> float:
    """0.5 free peak bandwidth + 0.3 bandwidth duration + 0.2 upload concurrency, each in
    [0, 1]; one function, as a decision scores some 15 hosts."""
    mx = h.max_tx_bandwidth
    if mx <= 0:
        return 0.0
    # free peak bandwidth
    tx = h.tx_bandwidth
    peak = 0.0 if tx >= mx else 1.0 - tx / mx
    # how much of the last DURATION_WINDOW its uploads took
    sent = h.upload_content_length
    if sent == 0:
        duration = 1.0
    else:
        ratio = sent * 8 / mx / DURATION_WINDOW
        duration = 0.0 if ratio >= 1.0 else 1.0 - ratio
    # pieces in flight against how many its bandwidth needs
    needed = mx / REFERENCE_PIECE / 8
    if needed <= 1.0:
        concurrency = 0.0
    elif h.concurrent_upload_pieces == 0:
        concurrency = 1.0
    else:
        ratio = h.concurrent_upload_pieces / needed
        concurrency = 1.0 if ratio <= 1.0 else 1.0 / ratio
    return 0.5 * peak + 0.3 * duration + 0.2 * concurrency


@lru_cache(maxsize=4096)  # a handful of distinct IDCs and locations; each pair is scored often
def idc_affinity(a: str, b: str) -> float:
    return 1.0 if a and b and a.lower() == b.lower() else 0.0


@lru_cache(maxsize=4096)
def location_affinity(a: str, b: str) -> float:
    if not a or not b:
        return 0.0
    if a.lower() == b.lower():
        return 1.0
    score = 0
    for x, y in list(zip(a.split("|"), b.split("|"), strict=False))[:LOCATION_LEVELS]:
        if x.lower() != y.lower():
            break
        score += 1
    return score / LOCATION_LEVELS


_SEED_SERVING = (PeerState.RUNNING, PeerState.PENDING)
_NORMAL = HostType.NORMAL  # an enum member looked up once (slow in 3.11)


def host_type_score(c: Candidate) -> float:
    if c.host.is_seed:
        return 1.0 if c.peer.state in _SEED_SERVING else 0.0
    return 0.5


def score(parent: Candidate, child: Candidate) -> float:
    ph, ch = parent.host, child.host
    return (
        0.6 * load_quality(ph)
        + 0.2 * idc_affinity(ph.idc, ch.idc)
        + 0.1 * location_affinity(ph.location, ch.location)
        + 0.1 * host_type_score(parent)
    )


def scores(child: Candidate, candidates: list[Candidate]) -> list[float]:
    """``[score(c, child) for c in candidates]``, the same sums in one loop: a decision scores
    some 15 parents, and five calls per parent cost more than the arithmetic (load_quality's
    is kept: inline it saved 1 µs a decision, not worth a second copy of the formula)."""
    ch = child.host
    cidc, cloc = ch.idc, ch.location
    normal = _NORMAL
    out = []
    for c in candidates:
        h = c.host
        kind = 0.5 if h.type is normal else 1.0 if c.peer.state in _SEED_SERVING else 0.0  # host_type_score
        # the same string object (hosts' are interned) is the same place: no cache lookup
        idc, loc = h.idc, h.location
        same_idc = (1.0 if idc else 0.0) if idc is cidc else idc_affinity(idc, cidc)
        same_loc = (1.0 if loc else 0.0) if loc is cloc else location_affinity(loc, cloc)
        out.append(0.6 * load_quality(h) + 0.2 * same_idc + 0.1 * same_loc + 0.1 * kind)
    return out


class DragonflyStrategy(Strategy):
    name: ClassVar[str] = "dragonfly"

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        s = scores(child, candidates)
        # highest first, ties in the candidates' order (as sorted(..., reverse=True) keeps them)
        return [candidates[i] for i in sorted(range(len(s)), key=s.__getitem__, reverse=True)]


@hookimpl
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    registry.add(DragonflyStrategy)
