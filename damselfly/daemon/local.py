"""``dfdaemon.v2.DfdaemonDownload`` on the unix socket: what local clients ask."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import empty_pb2, json_format

from damselfly.core.errors import (
    BackendError,
    DamselflyError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StorageError,
)
from damselfly.core.piece import ByteRange, Layout
from damselfly.daemon.localrelay import Caller, as_caller
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started, TaskRuntime
from damselfly.rpc.wire import ERROR_TYPE_KEY, piece_to_proto, task_to_proto, timestamp
from damselfly.security.admission import Origin, admitted, check_source, reads_this_node

if TYPE_CHECKING:
    from damselfly.daemon.daemon import Daemon


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


def caller_of(daemon: Daemon, context: grpc.aio.ServicerContext) -> Caller | None:
    """Who made this call on the local socket (uid, gid, groups, pid), or None when unknown."""
    relay = daemon.local_relay
    return relay.caller_of(context) if relay is not None else None


def _unknown_caller(output_path: str) -> PermissionDenied:
    return PermissionDenied(f"cannot write {output_path}: the local caller's identity is unknown")


async def check_output(output_path: str, overwrite: bool, caller: Caller | None) -> None:
    """Checked before the download, as the caller: an output the caller could not write
    itself (a directory it may not reach or write to) is refused, and nothing is written."""
    path = Path(output_path)
    if not path.is_absolute():
        raise InvalidArgument(f"output path must be absolute, got {output_path!r}")
    if caller is None:
        raise _unknown_caller(output_path)

    def probe() -> None:
        dfd = _open_dir(path.parent, caller)
        try:
            if not overwrite and _exists(path.name, dfd):
                raise InvalidArgument(f"output {output_path!r} exists (pass overwrite to replace it)")
            name = f".{path.name}.{secrets.token_hex(6)}.damselfly-probe"
            try:
                os.close(os.open(name, _CREATE, 0o600, dir_fd=dfd))
            except PermissionError:
                raise PermissionDenied(f"{caller} may not write to {str(path.parent)!r}") from None
            except OSError as exc:
                raise StorageError(f"cannot write to {str(path.parent)!r}: {exc.strerror}") from None
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)

    await as_caller(caller, probe)


_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(directory: Path, caller: Caller) -> int:
    """A handle on ``directory`` opened as ``caller`` (run in ``as_caller``): it must reach it."""
    try:
        return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidArgument(f"output directory {str(directory)!r} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"{caller} may not write to {str(directory)!r}") from None
    except OSError as exc:
        raise StorageError(f"cannot open {str(directory)!r}: {exc.strerror}") from None


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


async def check_local_read(url_or_path: str, caller: Caller | None) -> None:
    """A local client reads this node's files only as it could itself: root and the daemon's
    own user may name any local source; anyone else only ``file://`` paths (or a cache import
    path) it may open for reading, checked as that user before anything is read."""
    if "://" in url_or_path:
        scheme = urlsplit(url_or_path).scheme.lower()
        if not reads_this_node(scheme):
            return
    else:
        scheme = "file"
    if caller is not None and caller.uid in (0, os.geteuid()):
        return
    if caller is None:
        raise PermissionDenied(f"cannot read {url_or_path}: the local caller's identity is unknown")
    if scheme != "file":
        raise PermissionDenied(f"{scheme}:// reads this node's files as the daemon: {caller} may use file:// only")
    path = unquote(urlsplit(url_or_path).path) if "://" in url_or_path else url_or_path

    def probe() -> None:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError:
            raise PermissionDenied(f"{caller} may not read {path!r}") from None
        except OSError:
            pass  # missing and the like: the source says so in its own words

    await as_caller(caller, probe)


def local_opener(caller: Caller | None) -> Callable[[str], Awaitable[int]] | None:
    """How a download for ``caller`` opens local files: as the caller, so that the kernel checks
    each open (a path swapped for a symlink after ``check_local_read`` gains nothing); None for
    root and the daemon's own user, who may read what the daemon reads."""
    if caller is None or caller.uid in (0, os.geteuid()):
        return None

    async def open_as_caller(path: str) -> int:
        def opening() -> int:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except PermissionError:
                raise PermissionDenied(f"{caller} may not read {path!r}") from None

        return await as_caller(caller, opening, undo=os.close)

    return open_as_caller


def output_mode(daemon: Daemon) -> tuple[int, int]:
    """Mode and group (-1: the caller's) of the outputs the daemon writes. An output belongs to
    the user who asked for it (see ``localrelay``): 0600, or 0640 and the socket's group when
    one is set, so that the group allowed on the socket may read it."""
    group = daemon.settings.security.socket_group
    if not group:
        return 0o600, -1
    return 0o640, socket_gid(group)


def socket_gid(group: str) -> int:
    """The id of ``group`` (a name or a number); InvalidArgument naming the setting when unknown."""
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"security.socket_group: no group named {group!r}") from None


async def export_output(
    daemon: Daemon,
    task_id: str,
    output_path: str,
    byte_range: ByteRange | None = None,
    caller: Caller | None = None,
) -> None:
    """Copy the finished task (or its range) to a temp file beside the output, then rename it.

    The temp file is created and renamed by the caller (``as_caller``): it is the caller's,
    in a directory the caller may write, exactly as if the caller had written it, and it
    has its final mode (0600, or 0640 with the socket's group) before any byte is written.
    The daemon writes the bytes through the open file, never by a path the caller controls."""
    path = Path(output_path)
    if caller is None:
        raise _unknown_caller(output_path)
    mode, gid = output_mode(daemon)
    tmp = f".{path.name}.{secrets.token_hex(6)}.damselfly-tmp"

    def create() -> tuple[int, int]:
        dfd = _open_dir(path.parent, caller)
        try:
            return dfd, os.open(tmp, _CREATE, 0o600, dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise

    def discard(created: tuple[int, int]) -> None:  # made for a download that was cancelled meanwhile
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=created[0])
        os.close(created[1])
        os.close(created[0])

    try:
        dfd, fd = await as_caller(caller, create, discard)
    except PermissionError:
        raise PermissionDenied(f"{caller} may not write {output_path!r}") from None
    except OSError as exc:
        raise StorageError(f"cannot write {output_path}: {exc.strerror}") from None

    def rename() -> None:
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)

    try:
        try:
            if gid >= 0:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        except OSError as exc:
            raise StorageError(f"cannot set the mode of {output_path}: {exc.strerror}") from None
        if byte_range is None:
            await daemon.storage.export(task_id, Path(f"/proc/self/fd/{fd}"))  # the open file itself
        else:
            with open(fd, "wb", closefd=False) as f:
                async for chunk in daemon.storage.read_range(task_id, *byte_range):
                    await asyncio.to_thread(f.write, chunk)
        os.fchmod(fd, mode)
        try:
            await as_caller(caller, rename)
        except PermissionError:
            raise PermissionDenied(f"{caller} may not replace {output_path!r}") from None
        except OSError as exc:
            raise StorageError(f"cannot write {output_path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(fd)
        os.close(dfd)


async def progress_stream(
    daemon: Daemon,
    rt: TaskRuntime,
    context: grpc.aio.ServicerContext,
    *,
    with_content: bool,
    output_path: str = "",
    byte_range: ByteRange | None = None,
    caller: Caller | None = None,
) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
    """A client's view of a running download: started, then each piece it asked for, then
    its output written (the whole content, or ``byte_range`` of it)."""
    host_id = daemon.host_id
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
                piece.content = await daemon.storage.read_piece(rt.task_id, event.record.number)
            yield dfdaemon_pb2.DownloadTaskResponse(
                host_id=host_id,
                task_id=rt.task_id,
                peer_id=rt.peer_id,
                download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece),
            )
        elif isinstance(event, Finished):
            if output_path:
                try:
                    await export_output(daemon, rt.task_id, output_path, byte_range, caller)
                except DamselflyError as exc:
                    await abort_with(context, exc)
            return
        elif isinstance(event, Failed):
            await abort_with(context, event.error)


class LocalService(dfdaemon_pb2_grpc.DfdaemonDownloadServicer):
    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        from damselfly.daemon.download import DownloadRequest

        dl = request.download
        caller = caller_of(self.d, context)
        try:
            req = DownloadRequest.from_proto(dl)
            if not req.url:
                raise InvalidArgument("download needs a url")
            self.d.plugins.source_for(req.url)  # an unknown scheme fails before anything starts
            await check_local_read(req.url, caller)
            if dl.output_path:
                await check_output(dl.output_path, dl.overwrite, caller)
            rt = await self.d.start_download(req, open_local=local_opener(caller))
            self.d.gc.touch(rt.task_id)
        except DamselflyError as exc:
            await abort_with(context, exc)
            return
        async for resp in progress_stream(
            self.d,
            rt,
            context,
            with_content=dl.need_piece_content,
            output_path=dl.output_path,
            byte_range=req.range,
            caller=caller,
        ):
            yield resp

    async def StatTask(
        self, request: dfdaemon_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        task = self.d.storage.get(request.task_id)
        if task is not None:
            return task_to_proto(task)
        remote = await self.d.schedulers.stat_task(self.d.host_id, request.task_id)
        if remote is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return remote

    async def StatLocalTask(
        self, request: dfdaemon_pb2.StatLocalTaskRequest, context: grpc.aio.ServicerContext
    ) -> dfdaemon_pb2.StatLocalTaskResponse:
        task = self.d.storage.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return _local(task)

    async def ListTaskEntries(
        self, request: dfdaemon_pb2.ListTaskEntriesRequest, context: grpc.aio.ServicerContext
    ) -> dfdaemon_pb2.ListTaskEntriesResponse:
        """A directory of the origin (a bucket prefix, an HDFS directory, a repository), through its source."""
        from damselfly.daemon.download import SOURCE_OPTION_FIELDS

        options = {
            name: json_format.MessageToDict(getattr(request, name), preserving_proto_field_name=True)
            for name in SOURCE_OPTION_FIELDS
            if request.HasField(name)
        }
        source = None
        try:
            check_source(request.url, Origin.LOCAL, self.d.source_policy)
            await check_local_read(request.url, caller_of(self.d, context))
            with admitted(Origin.LOCAL, self.d.source_policy):
                source = self.d.plugins.make_source(request.url, options)
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
        return dfdaemon_pb2.ListLocalTasksResponse(tasks=[_local(t) for t in self.d.storage.tasks()])

    async def DeleteTask(
        self, request: dfdaemon_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.d.delete_task(request.task_id)
        return empty_pb2.Empty()

    async def DeleteLocalTask(
        self, request: dfdaemon_pb2.DeleteLocalTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.d.delete_task(request.task_id)
        return empty_pb2.Empty()


def _local(task: common_pb2.Task | object) -> dfdaemon_pb2.StatLocalTaskResponse:
    from damselfly.core.task import Task, TaskState

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


def admin_handler(daemon: Daemon) -> grpc.GenericRpcHandler:
    """Local-socket-only calls of damselfly's own (JSON in and out): ``Collect`` runs the GC now."""
    import json

    async def collect(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        report = await daemon.gc.collect()
        return json.dumps(report.to_dict()).encode()

    async def import_cache(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        from damselfly.daemon.cache import import_file

        try:
            args = json.loads(request)
            await check_local_read(str(args["path"]), caller_of(daemon, context))
            result = await import_file(
                daemon,
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

    def raw(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=lambda b: b, response_serializer=lambda b: b
        )

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE, {"Collect": raw(collect), "ImportCache": raw(import_cache)}
    )
