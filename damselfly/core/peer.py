"""A peer: one host's download of one task, and its place in the task's DAG."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class PeerState(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    BACK_TO_SOURCE = "BackToSource"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


_DONE = (PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE)


# weakref_slot: the scheduler keeps a peer's encoding for as long as the peer lives (and no longer)
@dataclass(slots=True, weakref_slot=True)
class Peer:
    id: str
    task_id: str
    host_id: str
    state: PeerState = PeerState.PENDING
    parents: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)
    finished_pieces: set[int] = field(default_factory=set)
    blocklist: set[str] = field(default_factory=set)
    piece_costs: list[float] = field(default_factory=list)  # seconds, most recent last
    need_back_to_source: bool = False
    schedule_count: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    priority: int = 0
    # registered metadata_only: the host says it holds the whole task (a claim nobody checked)
    metadata_only: bool = False
    # is_bad's outlier test, valid while _outlier_fresh (add_cost clears it)
    _outlier_fresh: bool = field(default=False, init=False, repr=False, compare=False)
    _outlier: bool = field(default=False, init=False, repr=False, compare=False)

    def add_cost(self, seconds: float, keep: int = 64) -> None:
        """Record a piece's download cost, keeping the last ``keep``."""
        costs = self.piece_costs
        costs.append(seconds)
        if len(costs) > keep:
            del costs[:-keep]
        self._outlier_fresh = False

    @property
    def done(self) -> bool:
        return self.state in _DONE

    def is_bad(self) -> bool:
        """A parent not to hand out: gone, or downloading and its last piece was an outlier.

        The outlier rule is upstream's (last cost above mean + 3 sigma, or above 20x the
        mean while there are fewer than 30 costs); it applies only to peers still
        fetching from other peers, since a finished peer's or a back-to-source peer's
        costs say nothing about how fast it serves now.
        """
        if self.state in (PeerState.FAILED, PeerState.LEAVE, PeerState.PENDING):
            return True
        if self.state is not PeerState.RUNNING:
            return False
        costs = self.piece_costs
        if len(costs) < 2:
            return False
        if not self._outlier_fresh:
            self._outlier, self._outlier_fresh = _outlier(costs), True
        return self._outlier


def _outlier(costs: list[float]) -> bool:
    last, earlier = costs[-1], costs[:-1]
    mean = sum(earlier) / len(earlier)
    if len(earlier) < 30:
        return last > 20 * mean if mean > 0 else False
    sigma = math.sqrt(sum((c - mean) ** 2 for c in earlier) / len(earlier))
    return last > mean + 3 * sigma
