"""What the daemon's parts share: the calls more than one of them makes on it, and the gRPC options.

Each part (``local``, ``upload``, ``proxyswarm``, ``gc``, ``cache``) is handed a small
context of its own, built by ``daemon.py`` from exactly what it uses: objects and calls,
never the daemon. The calls several contexts carry are typed once here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from damselfly.daemon.request import DownloadRequest
    from damselfly.daemon.runtime import TaskRuntime
    from damselfly.security.admission import Origin

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
    ("grpc.max_send_message_length", 128 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]

LocalOpener = Callable[[str], Awaitable[int]]  # opens a local file for a download, as its local caller
DeleteTask = Callable[[str], Awaitable[None]]  # drops a task: its runs, its bytes, the scheduler's record
TaskUse = Callable[[str], None]  # tells garbage collection that a task was used (or served) now


class StartDownload(Protocol):
    """Start (or join) the download of a request's task, admitted for its ``origin``."""

    def __call__(
        self,
        req: DownloadRequest,
        *,
        origin: Origin = ...,
        member: bool = ...,
        open_local: LocalOpener | None = ...,
    ) -> Awaitable[TaskRuntime]: ...
