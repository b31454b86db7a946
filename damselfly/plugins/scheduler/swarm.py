"""``swarm``: a mesh in which every peer uploads from its first piece, for large fan-outs.

Upstream's scheduler keeps parents in a DAG, so the peers at the bottom of it never
upload and the seed's link carries most copies. Here two peers may be parents of
each other (a child only fetches what a parent holds, so a cycle is simply an
exchange), every child gets up to ``parent_limit`` parents, and the seed always
ranks first: a seed running with ``daemon.super_seed`` offers each child different
pieces, which the children then trade. Because the mesh is not a DAG, the scheduler
also offers a peer, past the limit, the peers that fetch from it: a peer that
registered when everyone's parents were full still has somewhere to send what
the seed offered it.

Pair it, in the daemons, with the ``rarest-first`` piece picker and
``daemon.endgame_duplicates``. In the seed, use ``daemon.super_seed: true`` when the seed
is the only way in. With ``scheduler.source_shares`` every reader brings new pieces
in, and a super-seeding seed's upload sits idle, so the lab's ``swarm`` profile
leaves it off.
A parent whose last piece cost more than mean + 3 sigma of its earlier ones is
skipped by the scheduler whatever the strategy (``Peer.is_bad``).
"""

from __future__ import annotations

from typing import ClassVar

from damselfly.contracts import Candidate, Registry, Strategy
from damselfly.core.task import Task
from damselfly.hookspecs import hookimpl
from damselfly.plugins.scheduler.dragonfly import score


class SwarmStrategy(Strategy):
    name: ClassVar[str] = "swarm"
    dag: ClassVar[bool] = False
    parent_limit: ClassVar[int] = 12

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        def key(c: Candidate) -> tuple[bool, int, float]:
            return (c.host.is_seed, len(c.peer.finished_pieces), score(c, child))

        return sorted(candidates, key=key, reverse=True)


@hookimpl
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    registry.add(SwarmStrategy)
