"""How the daemon's gRPC services answer: a failure as a status code with Dragonfly's error-type
trailer, and a running download as the stream of ``DownloadTaskResponse`` its client follows.

Shared by the unix-socket service (``local``) and the upload service (``upload``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2

from damselfly.core.errors import (
    BackendError,
    DamselflyError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StorageError,
)
from damselfly.core.piece import ByteRange, Layout
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started, TaskRuntime
from damselfly.rpc.wire import ERROR_TYPE_KEY, piece_to_proto

if TYPE_CHECKING:
    from damselfly.contracts import Storage


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, BackendError):
        if exc.status_code in (401, 403):
            return grpc.StatusCode.PERMISSION_DENIED
        if exc.status_code == 404:
            return grpc.StatusCode.NOT_FOUND
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, StorageError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DamselflyError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    error_type = getattr(exc, "error_type", "dfdaemon")
    context.set_trailing_metadata(((ERROR_TYPE_KEY, error_type),))
    await context.abort(status_for(exc), str(exc) or type(exc).__name__)


async def progress_stream(
    host_id: str,
    storage: Storage,
    rt: TaskRuntime,
    context: grpc.aio.ServicerContext,
    *,
    with_content: bool,
    byte_range: ByteRange | None = None,
    export: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
    """A client's view of a running download on host ``host_id``: started, then each piece it
    asked for (those of ``byte_range``), then ``export``: its output written, when it has one."""
    wanted: range | None = None
    async for event in rt.follow():
        if isinstance(event, Started):
            started = dfdaemon_pb2.DownloadTaskStartedResponse(
                content_length=event.content_length, response_header=event.response_header
            )
            if byte_range is not None:
                started.range.CopyFrom(common_pb2.Range(start=byte_range[0], length=byte_range[1]))
                wanted = Layout(event.content_length, event.piece_length).numbers_for_range(*byte_range)
            yield dfdaemon_pb2.DownloadTaskResponse(
                host_id=host_id, task_id=rt.task_id, peer_id=rt.peer_id, download_task_started_response=started
            )
        elif isinstance(event, PieceEvent):
            if wanted is not None and event.record.number not in wanted:
                continue
            piece = piece_to_proto(event.record, event.traffic_type, event.parent_id, event.cost)
            if with_content:
                piece.content = await storage.read_piece(rt.task_id, event.record.number)
            yield dfdaemon_pb2.DownloadTaskResponse(
                host_id=host_id,
                task_id=rt.task_id,
                peer_id=rt.peer_id,
                download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece),
            )
        elif isinstance(event, Finished):
            if export is not None:
                try:
                    await export()
                except DamselflyError as exc:
                    await abort_with(context, exc)
            return
        elif isinstance(event, Failed):
            await abort_with(context, event.error)
