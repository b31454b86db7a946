"""``default``: Dragonfly's evaluator, scored the way upstream's scheduler scores.

score = 0.6 load quality + 0.2 IDC affinity + 0.1 location affinity + 0.1 host type
load quality = 0.5 free peak bandwidth + 0.3 bandwidth duration + 0.2 concurrency
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

from damselfly.contracts import Candidate, Strategy
from damselfly.core.host import Host
from damselfly.core.peer import PeerState
from damselfly.core.task import Task
from damselfly.hookspecs import hookimpl

LOCATION_LEVELS = 5
DURATION_WINDOW = 60.0  # seconds
REFERENCE_PIECE = 16 * 1024 * 1024


def peak_bandwidth_score(h: Host) -> float:
    if h.max_tx_bandwidth <= 0 or h.tx_bandwidth >= h.max_tx_bandwidth:
        return 0.0
    return 1.0 - h.tx_bandwidth / h.max_tx_bandwidth


def bandwidth_duration_score(h: Host) -> float:
    if h.max_tx_bandwidth <= 0:
        return 0.0
    if h.upload_content_length == 0:
        return 1.0
    ratio = h.upload_content_length * 8 / h.max_tx_bandwidth / DURATION_WINDOW
    return 0.0 if ratio >= 1.0 else 1.0 - ratio


def concurrency_score(h: Host) -> float:
    if h.max_tx_bandwidth <= 0:
        return 0.0
    needed = h.max_tx_bandwidth / REFERENCE_PIECE / 8
    if needed <= 1.0:
        return 0.0
    if h.concurrent_upload_pieces == 0:
        return 1.0
    ratio = h.concurrent_upload_pieces / needed
    return 1.0 if ratio <= 1.0 else 1.0 / ratio


def load_quality(h: Host) -> float:
    return 0.5 * peak_bandwidth_score(h) + 0.3 * bandwidth_duration_score(h) + 0.2 * concurrency_score(h)


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


def host_type_score(c: Candidate) -> float:
    if c.host.is_seed:
        return 1.0 if c.peer.state in (PeerState.RUNNING, PeerState.PENDING) else 0.0
    return 0.5


def score(parent: Candidate, child: Candidate) -> float:
    return (
        0.6 * load_quality(parent.host)
        + 0.2 * idc_affinity(parent.host.idc, child.host.idc)
        + 0.1 * location_affinity(parent.host.location, child.host.location)
        + 0.1 * host_type_score(parent)
    )


class DefaultStrategy(Strategy):
    name: ClassVar[str] = "default"

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        return sorted(candidates, key=lambda c: score(c, child), reverse=True)


@hookimpl
def damselfly_add_strategies(registry):  # type: ignore[no-untyped-def]
    registry.add(DefaultStrategy)
