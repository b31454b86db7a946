"""``damselfly.Client``: download through a local daemon, from any Python program.

    async with Client("/path/to/dfdaemon.sock") as c:
        result = await c.download("https://example.com/big.bin", "/tmp/big.bin")

``SyncClient`` offers the same calls for code without an event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import json_format

from damselfly.core.errors import (
    BackendError,
    DamselflyError,
    InvalidArgument,
    NotFound,
    PeerError,
    PermissionDenied,
    StorageError,
)
from damselfly.core.vortex import TrafficType
from damselfly.plugins.source.options import REQUEST_CONFIGS
from damselfly.rpc.wire import ERROR_TYPE_KEY, duration


@dataclass
class Progress:
    task_id: str = ""
    content_length: int = -1
    done_bytes: int = 0
    peer_bytes: int = 0
    source_bytes: int = 0
    local_bytes: int = 0
    pieces: int = 0
    bytes_by_parent: dict[str, int] = field(default_factory=dict)  # remote-peer bytes per parent peer id
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.done_bytes / max(time.monotonic() - self.started, 1e-6)


@dataclass(frozen=True)
class DownloadResult:
    task_id: str
    peer_id: str
    content_length: int
    peer_bytes: int
    source_bytes: int
    local_bytes: int
    seconds: float
    output: Path | None
    bytes_by_parent: dict[str, int] = field(default_factory=dict)


def _error(exc: grpc.aio.AioRpcError) -> DamselflyError:
    msg = exc.details() or exc.code().name
    error_type = dict(exc.trailing_metadata() or ()).get(ERROR_TYPE_KEY, "")
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(msg)
    if code == grpc.StatusCode.NOT_FOUND:
        return BackendError(msg, status_code=404) if error_type == "backend" else NotFound(msg)
    if error_type == "backend":
        return BackendError(msg, status_code=403 if code == grpc.StatusCode.PERMISSION_DENIED else 0)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(msg)  # the daemon's policy refused the request (its message names the setting)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return StorageError(msg)
    if code == grpc.StatusCode.UNAVAILABLE and ("unix:" in msg or "failed to connect" in msg.lower()):
        return PeerError(f"cannot reach the daemon: {msg}")
    return PeerError(msg)


_TO_END = (1 << 63) - 1


# the Download's source messages a request may fill (those the daemon's sources read)
SOURCE_OPTION_GROUPS = tuple(config.message for config in REQUEST_CONFIGS)


def _check_group(name: str) -> None:
    if name not in SOURCE_OPTION_GROUPS:
        raise InvalidArgument(f"unknown source option group {name!r} ({', '.join(SOURCE_OPTION_GROUPS)})")


def _fill_source_options(download: common_pb2.Download, options: dict[str, dict[str, Any]] | None) -> None:
    for name, values in (options or {}).items():
        _check_group(name)
        try:
            json_format.ParseDict({k: v for k, v in values.items() if v is not None}, getattr(download, name))
        except json_format.ParseError as exc:
            raise InvalidArgument(f"bad {name} options: {exc}") from None


class Client:
    def __init__(self, socket: str | Path):
        self.socket = Path(socket)
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _channel_or_open(self) -> grpc.aio.Channel:
        if not self.socket.exists():
            raise PeerError(f"no daemon socket at {self.socket} (is `damselfly daemon` running?)")
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket}", options=[("grpc.max_receive_message_length", 128 * 1024 * 1024)]
            )
        return self._channel

    def _stub(self) -> dfdaemon_pb2_grpc.DfdaemonDownloadStub:
        return dfdaemon_pb2_grpc.DfdaemonDownloadStub(self._channel_or_open())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def download(
        self,
        url: str,
        output: str | Path | None = None,
        *,
        headers: dict[str, str] | None = None,
        digest: str = "",
        tag: str = "",
        application: str = "",
        filtered_query_params: list[str] | tuple[str, ...] = (),
        piece_length: int = 0,
        priority: int = 0,
        timeout: float | None = None,
        need_back_to_source: bool = False,
        disable_back_to_source: bool = False,
        overwrite: bool = True,
        byte_range: tuple[int, int] | None = None,
        source_options: dict[str, dict[str, Any]] | None = None,
        content_for_calculating_task_id: str = "",
        on_progress: Callable[[Progress], Any] | None = None,
    ) -> DownloadResult:
        """Download ``url`` through the daemon; with ``output`` the daemon writes it there atomically.

        ``byte_range=(start, length)`` fetches only the pieces that overlap those bytes, and
        writes only those bytes to ``output``. ``source_options`` fills the Download's
        ``object_storage``, ``hdfs`` and ``hugging_face`` messages (keys as in the proto,
        e.g. ``{"object_storage": {"region": ..., "endpoint": ...}}``), which the source
        plugin that reads the origin takes its credentials and endpoint from.
        """
        if not self.socket.exists():
            raise PeerError(f"no daemon socket at {self.socket} (is `damselfly daemon` running?)")
        out = Path(output).resolve() if output is not None else None
        download = common_pb2.Download(
            url=url,
            digest=digest,
            tag=tag,
            application=application,
            priority=priority,
            filtered_query_params=list(filtered_query_params),
            request_header=dict(headers or {}),
            piece_length=piece_length,
            output_path=str(out) if out else "",
            need_back_to_source=need_back_to_source,
            disable_back_to_source=disable_back_to_source,
            overwrite=overwrite,
            content_for_calculating_task_id=content_for_calculating_task_id,
        )
        if timeout:
            download.timeout.CopyFrom(duration(timeout))
        if byte_range is not None:
            download.range.CopyFrom(common_pb2.Range(start=byte_range[0], length=byte_range[1]))
        _fill_source_options(download, source_options)
        progress = Progress()
        peer_id = ""
        started = time.monotonic()
        call = self._stub().DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=timeout)
        try:
            async for resp in call:
                progress.task_id, peer_id = resp.task_id, resp.peer_id
                kind = resp.WhichOneof("response")
                if kind == "download_task_started_response":
                    progress.content_length = resp.download_task_started_response.content_length
                elif kind == "download_piece_finished_response":
                    piece = resp.download_piece_finished_response.piece
                    progress.pieces += 1
                    progress.done_bytes += piece.length
                    if piece.traffic_type == TrafficType.BACK_TO_SOURCE:
                        progress.source_bytes += piece.length
                    elif piece.traffic_type == TrafficType.LOCAL_PEER:
                        progress.local_bytes += piece.length
                    else:
                        progress.peer_bytes += piece.length
                        by = progress.bytes_by_parent
                        by[piece.parent_id] = by.get(piece.parent_id, 0) + piece.length
                if on_progress is not None:
                    on_progress(progress)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PeerError(f"download of {url} timed out after {timeout}s") from None
            raise _error(exc) from None
        return DownloadResult(
            progress.task_id,
            peer_id,
            max(progress.content_length, 0),
            progress.peer_bytes,
            progress.source_bytes,
            progress.local_bytes,
            time.monotonic() - started,
            out,
            progress.bytes_by_parent,
        )

    async def read(self, url: str, start: int = 0, length: int | None = None, **kwargs: Any) -> bytes:
        """The bytes ``[start, start + length)`` of ``url`` (to the end when ``length`` is None).

        Only the pieces that overlap the range are fetched (from peers, else the origin)
        and kept in the daemon's cache; their bytes come back in the gRPC stream, so
        nothing is written to a file. Keyword arguments are those of ``read_pieces``.
        """
        if length == 0:
            return b""
        content_length, pieces = await self.read_pieces(url, start, length, **kwargs)
        end = content_length if length is None else min(start + length, content_length)
        out = bytearray()
        for offset in sorted(pieces):
            data = pieces[offset]
            lo, hi = max(start, offset), min(end, offset + len(data))
            if lo < hi:
                if lo != start + len(out):
                    raise PeerError(f"read of {url}: the daemon left a gap at byte {start + len(out)}")
                out += data[lo - offset : hi - offset]
        if start < end and len(out) != end - start:
            raise PeerError(f"read of {url}: got {len(out)} of {end - start} bytes")
        return bytes(out)

    async def read_pieces(
        self,
        url: str,
        start: int = 0,
        length: int | None = None,
        *,
        headers: dict[str, str] | None = None,
        tag: str = "",
        application: str = "",
        filtered_query_params: list[str] | tuple[str, ...] = (),
        piece_length: int = 0,
        timeout: float | None = None,
        source_options: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[int, dict[int, bytes]]:
        """The content length of ``url`` and the whole pieces (by offset) that overlap the range."""
        if not self.socket.exists():
            raise PeerError(f"no daemon socket at {self.socket} (is `damselfly daemon` running?)")
        if start < 0 or (length is not None and length <= 0):
            raise InvalidArgument(f"bad range start={start} length={length}")
        download = common_pb2.Download(
            url=url,
            type=common_pb2.TaskType.STANDARD,
            tag=tag,
            application=application,
            filtered_query_params=list(filtered_query_params),
            request_header=dict(headers or {}),
            piece_length=piece_length,
            need_piece_content=True,
        )
        if start or length is not None:  # else the whole task, as a full peer
            # an open-ended range asks for a huge length; the daemon clips it to the content
            download.range.CopyFrom(common_pb2.Range(start=start, length=length if length is not None else _TO_END))
        if timeout:
            download.timeout.CopyFrom(duration(timeout))
        _fill_source_options(download, source_options)
        pieces: dict[int, bytes] = {}
        content_length = -1
        call = self._stub().DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=timeout)
        try:
            async for resp in call:
                kind = resp.WhichOneof("response")
                if kind == "download_task_started_response":
                    content_length = resp.download_task_started_response.content_length
                elif kind == "download_piece_finished_response":
                    piece = resp.download_piece_finished_response.piece
                    pieces[piece.offset] = piece.content
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PeerError(f"read of {url} timed out after {timeout}s") from None
            raise _error(exc) from None
        return content_length, pieces

    async def list_entries(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        source_options: dict[str, dict[str, Any]] | None = None,
        timeout: float = 60,
    ) -> list[dfdaemon_pb2.Entry]:
        """What lies under ``url`` at the origin (files and directories, recursively), via the daemon's source."""
        req = dfdaemon_pb2.ListTaskEntriesRequest(url=url, request_header=dict(headers or {}))
        for name, values in (source_options or {}).items():
            _check_group(name)
            json_format.ParseDict({k: v for k, v in values.items() if v is not None}, getattr(req, name))
        try:
            resp = await self._stub().ListTaskEntries(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(resp.entries)

    async def _admin(self, method: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        call = self._channel_or_open().unary_unary(
            f"/damselfly.v1.Admin/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            raw = await call(json.dumps(args).encode(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return json.loads(raw)  # type: ignore[no-any-return]

    async def collect_garbage(self) -> dict[str, Any]:
        """Run the daemon's garbage collection now; its report (removed tasks and why, bytes freed)."""
        return await self._admin("Collect", {}, 120)

    async def task_timeline(self, task_id: str) -> list[dict[str, Any]]:
        """The piece timeline of ``task_id``'s running (else last) download in the daemon: one dict
        per step (``at``, ``kind``, ``piece``, ``parent_id``, ``detail``, ``length``, ``seconds``)."""
        answer = await self._admin("Timeline", {"task_id": task_id}, 30)
        return list(answer["events"])

    async def cache_import(
        self, path: str | Path, *, ttl: float, replicas: int = 1, tag: str = "", application: str = ""
    ) -> dict[str, Any]:
        """Put a local file into the swarm as a persistent cache task, on ``replicas`` hosts for ``ttl`` seconds.

        Returns ``task_id``, ``url``, ``content_length``, ``expires_at`` and ``replicas`` (host ids).
        """
        args = {
            "path": str(Path(path).resolve()),
            "ttl": ttl,
            "replicas": replicas,
            "tag": tag,
            "application": application,
        }
        return await self._admin("ImportCache", args, 900)

    async def cache_stat(self, task_id: str) -> common_pb2.Task:
        task = await self.stat_task(task_id)
        if not task.url.startswith("damselfly-cache://"):
            raise InvalidArgument(f"task {task_id} is not a cache task (url {task.url!r})")
        return task

    async def cache_export(self, task_id: str, output: str | Path, *, timeout: float | None = None) -> DownloadResult:
        """Write cache task ``task_id`` to ``output``, from whichever peer holds it."""
        task = await self.cache_stat(task_id)
        return await self.download(
            task.url, output, content_for_calculating_task_id=task.url, disable_back_to_source=True, timeout=timeout
        )

    async def list_tasks(self) -> list[dfdaemon_pb2.StatLocalTaskResponse]:
        try:
            resp = await self._stub().ListLocalTasks(dfdaemon_pb2.ListLocalTasksRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(resp.tasks)

    async def stat_task(self, task_id: str) -> common_pb2.Task:
        try:
            return await self._stub().StatTask(dfdaemon_pb2.StatTaskRequest(task_id=task_id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def delete_task(self, task_id: str) -> None:
        try:
            await self._stub().DeleteTask(dfdaemon_pb2.DeleteTaskRequest(task_id=task_id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None


class SyncClient:
    """The same calls, each run to completion on a private event loop."""

    def __init__(self, socket: str | Path):
        self.socket = Path(socket)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            async with Client(self.socket) as c:
                return await getattr(c, method)(*args, **kwargs)

        return asyncio.run(call())

    def download(self, url: str, output: str | Path | None = None, **kwargs: Any) -> DownloadResult:
        return self._run("download", url, output, **kwargs)

    def read(self, url: str, start: int = 0, length: int | None = None, **kwargs: Any) -> bytes:
        return self._run("read", url, start, length, **kwargs)  # type: ignore[no-any-return]

    def list_entries(self, url: str, **kwargs: Any) -> list[dfdaemon_pb2.Entry]:
        return self._run("list_entries", url, **kwargs)  # type: ignore[no-any-return]

    def collect_garbage(self) -> dict[str, Any]:
        return self._run("collect_garbage")  # type: ignore[no-any-return]

    def task_timeline(self, task_id: str) -> list[dict[str, Any]]:
        return self._run("task_timeline", task_id)  # type: ignore[no-any-return]

    def cache_import(self, path: str | Path, **kwargs: Any) -> dict[str, Any]:
        return self._run("cache_import", path, **kwargs)  # type: ignore[no-any-return]

    def cache_export(self, task_id: str, output: str | Path, **kwargs: Any) -> DownloadResult:
        return self._run("cache_export", task_id, output, **kwargs)  # type: ignore[no-any-return]

    def cache_stat(self, task_id: str) -> common_pb2.Task:
        return self._run("cache_stat", task_id)  # type: ignore[no-any-return]

    def list_tasks(self) -> list[dfdaemon_pb2.StatLocalTaskResponse]:
        return self._run("list_tasks")

    def stat_task(self, task_id: str) -> common_pb2.Task:
        return self._run("stat_task", task_id)

    def delete_task(self, task_id: str) -> None:
        self._run("delete_task", task_id)
