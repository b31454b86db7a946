"""A plugin that appends each verified piece to ``$DAMSELFLY_SWARM_TRACE`` as a JSON line.

``SwarmLab.run(trace=True)`` loads it in every daemon (``plugins.load``), which
gives a timeline of who fetched which piece from whom, and when.
"""

from __future__ import annotations

import json
import os
import time

from damselfly.hookspecs import hookimpl


@hookimpl
def damselfly_piece_verified(task_id: str, number: int, length: int, parent_id: str, traffic_type: int) -> None:
    path = os.environ.get("DAMSELFLY_SWARM_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"t": time.time(), "n": number, "parent": parent_id, "traffic": traffic_type}) + "\n")
