"""``dfdaemon.v2.DfdaemonDownload`` on the unix socket: what local clients ask.

Local clients may name this node's files and outputs (checked as the caller, by
``localfiles``); the socket also carries damselfly's own admin calls (``admin_handler``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import empty_pb2

from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound
from damselfly.core.task import Task, TaskState
from damselfly.daemon.localfiles import check_local_read, check_output, export_output, local_opener
from damselfly.daemon.replies import abort_with, progress_stream
from damselfly.daemon.request import DownloadRequest, source_options_from_proto
from damselfly.rpc.wire import task_to_proto, timestamp
from damselfly.security.admission import Origin, admitted, check_source

if TYPE_CHECKING:
    from damselfly.contracts import Source, Storage
    from damselfly.daemon.context import DeleteTask, StartDownload, TaskUse
    from damselfly.daemon.gc import GcReport
    from damselfly.daemon.localrelay import Caller
    from damselfly.daemon.runtime import TimelineEvent
    from damselfly.security.policy import SourcePolicy


@dataclass(frozen=True)
class LocalContext:
    """What the unix-socket services need of the daemon."""

    host_id: str
    storage: Storage
    source_policy: SourcePolicy
    source_for: Callable[[str], object]  # the source plugin of a url's scheme: raises for an unknown one
    make_source: Callable[[str, dict[str, dict[str, Any]]], Source]
    caller_of: Callable[[grpc.aio.ServicerContext], Caller | None]  # who calls, as the socket's relay tells
    socket_group: str  # security.socket_group: the group outputs are given
    start_download: StartDownload
    delete_task: DeleteTask
    touch: TaskUse
    stat_remote: Callable[[str], Awaitable[common_pb2.Task | None]]  # the schedulers' view of a task
    collect: Callable[[], Awaitable[GcReport]]  # a garbage collection, now
    import_cache: Callable[[str, float, int, str, str], Awaitable[dict[str, Any]]]  # cache.import_file
    timeline: Callable[[str], list[TimelineEvent] | None]  # a task's piece timeline (TaskBoard.timeline)


class LocalService(dfdaemon_pb2_grpc.DfdaemonDownloadServicer):
    def __init__(self, ctx: LocalContext):
        self.ctx = ctx

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        ctx = self.ctx
        dl = request.download
        caller = ctx.caller_of(context)
        try:
            req = DownloadRequest.from_proto(dl)
            if not req.url:
                raise InvalidArgument("download needs a url")
            ctx.source_for(req.url)  # an unknown scheme fails before anything starts
            await check_local_read(req.url, caller)
            if dl.output_path:
                await check_output(dl.output_path, dl.overwrite, caller)
            rt = await ctx.start_download(req, open_local=local_opener(caller))
            ctx.touch(rt.task_id)
        except DamselflyError as exc:
            await abort_with(context, exc)
            return
        export = None
        if dl.output_path:
            export = functools.partial(
                export_output, ctx.storage, rt.task_id, dl.output_path, req.range, caller, socket_group=ctx.socket_group
            )
        async for resp in progress_stream(
            ctx.host_id,
            ctx.storage,
            rt,
            context,
            with_content=dl.need_piece_content,
            byte_range=req.range,
            export=export,
        ):
            yield resp

    async def StatTask(
        self, request: dfdaemon_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        task = self.ctx.storage.get(request.task_id)
        if task is not None:
            return task_to_proto(task)
        remote = await self.ctx.stat_remote(request.task_id)
        if remote is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return remote

    async def StatLocalTask(
        self, request: dfdaemon_pb2.StatLocalTaskRequest, context: grpc.aio.ServicerContext
    ) -> dfdaemon_pb2.StatLocalTaskResponse:
        task = self.ctx.storage.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return _local(task)

    async def ListTaskEntries(
        self, request: dfdaemon_pb2.ListTaskEntriesRequest, context: grpc.aio.ServicerContext
    ) -> dfdaemon_pb2.ListTaskEntriesResponse:
        """A directory of the origin (a bucket prefix, an HDFS directory, a repository), through its source."""
        ctx = self.ctx
        options = source_options_from_proto(request)
        source = None
        try:
            check_source(request.url, Origin.LOCAL, ctx.source_policy)
            await check_local_read(request.url, ctx.caller_of(context))
            with admitted(Origin.LOCAL, ctx.source_policy):
                source = ctx.make_source(request.url, options)
            entries = await source.list(request.url, dict(request.request_header))
        except DamselflyError as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable") from None
        finally:
            if source is not None:
                await source.close()
        return dfdaemon_pb2.ListTaskEntriesResponse(
            content_length=sum(e.content_length for e in entries),
            status_code=200,
            entries=[dfdaemon_pb2.Entry(url=e.url, content_length=e.content_length, is_dir=e.is_dir) for e in entries],
        )

    async def ListLocalTasks(
        self, request: dfdaemon_pb2.ListLocalTasksRequest, context: grpc.aio.ServicerContext
    ) -> dfdaemon_pb2.ListLocalTasksResponse:
        return dfdaemon_pb2.ListLocalTasksResponse(tasks=[_local(t) for t in self.ctx.storage.tasks()])

    async def DeleteTask(
        self, request: dfdaemon_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.ctx.delete_task(request.task_id)
        return empty_pb2.Empty()

    async def DeleteLocalTask(
        self, request: dfdaemon_pb2.DeleteLocalTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.ctx.delete_task(request.task_id)
        return empty_pb2.Empty()


def _local(task: common_pb2.Task | object) -> dfdaemon_pb2.StatLocalTaskResponse:
    assert isinstance(task, Task)
    resp = dfdaemon_pb2.StatLocalTaskResponse(
        task_id=task.id,
        piece_length=task.piece_length,
        content_length=task.content_length,
        response_header=task.response_header,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
    )
    if task.state is TaskState.SUCCEEDED:
        resp.finished_at.CopyFrom(timestamp(task.updated_at))
    return resp


ADMIN_SERVICE = "damselfly.v1.Admin"


def admin_handler(ctx: LocalContext) -> grpc.GenericRpcHandler:
    """Local-socket-only calls of damselfly's own (JSON in and out): ``Collect`` runs the GC now,
    ``ImportCache`` imports a file as a persistent cache task, ``Timeline`` gives the piece
    timeline of a task's running (else last) download here."""

    async def collect(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        report = await ctx.collect()
        return json.dumps(report.to_dict()).encode()

    async def import_cache(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            args = json.loads(request)
            await check_local_read(str(args["path"]), ctx.caller_of(context))
            result = await ctx.import_cache(
                str(args["path"]),
                float(args["ttl"]),
                int(args.get("replicas", 1)),
                str(args.get("tag", "")),
                str(args.get("application", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            await abort_with(context, InvalidArgument(f"bad cache import request: {exc}"))
        except DamselflyError as exc:
            await abort_with(context, exc)
        return json.dumps(result).encode()

    async def timeline(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            task_id = str(json.loads(request)["task_id"])
        except (ValueError, KeyError, TypeError) as exc:
            await abort_with(context, InvalidArgument(f"bad timeline request: {exc}"))
        events = ctx.timeline(task_id)
        if events is None:
            await abort_with(context, NotFound(f"no download of task {task_id} ran in this daemon since it started"))
        return json.dumps({"task_id": task_id, "events": [e.to_dict() for e in events or ()]}).encode()

    def raw(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=lambda b: b, response_serializer=lambda b: b
        )

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE, {"Collect": raw(collect), "ImportCache": raw(import_cache), "Timeline": raw(timeline)}
    )
