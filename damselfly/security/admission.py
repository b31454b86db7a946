"""The one admission point: every download request is classified by where it came
from, and that decides which sources it may use and with whose credentials.

(Contract written first; the rules are filled in by the admission work.)
"""

from __future__ import annotations

import enum


class Origin(enum.Enum):
    """Where a download request came from."""

    LOCAL = "local"  # the daemon's unix socket: a user of this node
    PROXY = "proxy"  # a client of the node's HTTP proxy (containers, pods)
    UPLOAD = "upload"  # DfdaemonUpload.DownloadTask from another cluster member
    SCHEDULER = "scheduler"  # a seed trigger the scheduler sent over the upload API
    PREHEAT = "preheat"  # a preheat job
    INTERNAL = "internal"  # the daemon itself (cache import, re-announce)

    @property
    def from_network(self) -> bool:
        return self not in (Origin.LOCAL, Origin.INTERNAL)
