"""Super-seeding: a seed sends each piece once while it still holds pieces nobody has.

A seed's link is the one way new bytes enter the swarm. A seed that answers every
request sends the early pieces several times over while later ones wait, and its
link becomes the bottleneck. With ``daemon.super_seed`` the seed declines a piece it
has sent before while it holds another that it has never sent: the child gets the
first from a peer, and the seed's upload goes to a new piece. Once every piece the
seed holds has gone out at least once, it serves whatever is asked, so a piece whose
only copy left with a peer that then vanished is still served.
"""

from __future__ import annotations


class SuperSeeder:
    def __init__(self) -> None:
        self.sent: set[int] = set()

    def admit(self, number: int, held: set[int] | dict[int, object]) -> bool:
        """Whether to send piece ``number`` now, the seed holding ``held``."""
        if number not in self.sent:
            self.sent.add(number)
            return True
        return all(n in self.sent for n in held)
