"""``locality``: parents in the child's IDC first, then the longest shared location prefix, then load.

For swarms that span data centres or racks, where cross-site bytes cost more than a
busier parent nearby: the IDC and the ``|``-separated location (coarse to fine,
e.g. ``asia|cn|hz|rack7``) decide first, and upstream's load score (free upload
bandwidth, recent upload volume, concurrency, host type) only orders parents that
are equally close. A parent with nothing in common still ranks, after all the
close ones, so a child is never left without parents.
"""

from __future__ import annotations

from typing import ClassVar

from damselfly.contracts import Candidate, Registry, Strategy
from damselfly.core.task import Task
from damselfly.hookspecs import hookimpl
from damselfly.plugins.scheduler.dragonfly import idc_affinity, location_affinity, score


class LocalityStrategy(Strategy):
    name: ClassVar[str] = "locality"

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        def key(c: Candidate) -> tuple[float, float, float]:
            return (
                idc_affinity(c.host.idc, child.host.idc),
                location_affinity(c.host.location, child.host.location),
                score(c, child),
            )

        return sorted(candidates, key=key, reverse=True)


@hookimpl
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    registry.add(LocalityStrategy)
