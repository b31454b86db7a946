"""What a download uses of its daemon: objects and calls, never the daemon.

``daemon.py`` builds one ``DownloadContext`` and hands it to every ``Downloader``; the
fetch from parents (``parents.py``) reads the same context.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from damselfly.config import DaemonConfig
    from damselfly.contracts import PiecePicker, Storage
    from damselfly.core.task import Task
    from damselfly.daemon.pool import ConnectionPool
    from damselfly.daemon.schedulers import SchedulerPool
    from damselfly.plugin_manager import Plugins
    from damselfly.telemetry.metrics import DaemonMetrics


@dataclass(frozen=True)
class DownloadContext:
    """The daemon's parts a download works with."""

    host_id: str
    is_seed: bool
    config: DaemonConfig
    piece_digest: str  # the strong digest this daemon computes of what it reads from the source
    storage: Storage
    plugins: Plugins  # sources, and the piece and task hooks
    metrics: DaemonMetrics
    pool: ConnectionPool  # piece connections to parents, shared by every download
    picker: PiecePicker
    schedulers: SchedulerPool
    new_peer_id: Callable[[], str]  # a fresh peer id of this host
    upload_channel: Callable[[str], grpc.aio.Channel]  # to another daemon's upload server
    scheduler_lost: Callable[[str], None]  # a scheduler stopped answering: its tasks move on
    offer_pieces: Callable[[Task], None]  # a super-seeding seed offers a new piece to one child
    announce_finished: Callable[[Task], Coroutine[Any, Any, bool]]  # a finished task registered with its scheduler
    spawn: Callable[[Coroutine[Any, Any, Any]], object]  # runs beside the daemon, ends with it
