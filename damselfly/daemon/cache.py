"""Persistent cache tasks (Dragonfly's dfcache): content put into the swarm by hand, kept on replicas.

``import_file`` stores a local file on this daemon as a task whose url is
``damselfly-cache://SHA256`` (task id: the sha256 of that url), registers with the
scheduler as the task's source reader (it asks to go back to source, and reports each
piece with its strong digest, the one replicas and exporters check pieces against),
then asks ``replicas - 1`` other hosts, chosen by rendezvous
hashing on the task id, to download it from the swarm (never from an origin:
there is none). Each copy keeps the task until its TTL ends: garbage collection
neither evicts it early nor keeps it longer. ``damselfly cache export ID`` on any
peer then finds the url through the scheduler and downloads it from whichever
replica is up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from loguru import logger

from damselfly.contracts import DigestingWriter, strong_of
from damselfly.core import ids, vortex
from damselfly.core.errors import InvalidArgument, StorageError, Unavailable
from damselfly.core.ids import cache_url
from damselfly.core.piece import Layout, digest
from damselfly.core.task import Task, TaskState
from damselfly.daemon.request import CACHE_EXPIRES_HEADER, DownloadRequest
from damselfly.rpc.wire import piece_to_proto

if TYPE_CHECKING:
    from dragonfly_api import scheduler_pb2_grpc

    from damselfly.contracts import Storage
    from damselfly.daemon.context import TaskUse

CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheContext:
    """What a cache import needs of the daemon: its storage, its scheduler and the other hosts."""

    host_id: str
    storage: Storage
    piece_digest: str  # security.piece_digest: what this host, the source reader, keeps per piece
    touch: TaskUse
    new_peer_id: Callable[[], str]  # a fresh peer id of this host
    stub_for: Callable[[str], Awaitable[scheduler_pb2_grpc.SchedulerStub | None]]  # the task's scheduler
    upload_channel: Callable[[str], grpc.aio.Channel]  # to another daemon's upload server


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


async def import_file(
    ctx: CacheContext, path: str, ttl: float, replicas: int, tag: str = "", application: str = ""
) -> dict[str, Any]:
    """Import the file at ``path`` for ``ttl`` seconds on ``replicas`` hosts (this one first)."""
    src = Path(path)
    if not src.is_absolute():
        raise InvalidArgument(f"cache import needs an absolute path, got {path!r}")
    if not src.is_file():
        raise InvalidArgument(f"cannot import {path!r}: not a readable file")
    if ttl <= 0 or replicas < 1:
        raise InvalidArgument("cache import needs a positive --ttl and at least one replica")
    sha = await asyncio.to_thread(_sha256, src)
    url = cache_url(sha, tag, application)
    task_id = ids.keyed_task_id(url)  # as its content_for_calculating_task_id (the url) names it
    size = src.stat().st_size
    expires = time.time() + ttl
    task = ctx.storage.get(task_id)
    if task is None or task.state is not TaskState.SUCCEEDED:
        layout = Layout.for_content(size)
        task = await ctx.storage.create(
            Task(
                id=task_id,
                url=url,
                content_length=size,
                piece_length=layout.piece_length,
                tag=tag,
                application=application,
            )
        )
        for span in task.layout.spans():
            if span.number in task.pieces:
                continue
            data = await asyncio.to_thread(_read, src, span.offset, span.length)
            if len(data) != span.length:
                raise StorageError(f"{path} changed while it was imported")
            # this daemon is the cache task's source reader: it keeps each piece's strong digest
            writer = DigestingWriter(ctx.storage.writer(task_id, span), ctx.piece_digest, span.number)
            try:
                await asyncio.to_thread(writer.write, data)
                await writer.commit(digest(data))
            except BaseException:
                writer.abort()
                raise
    task.expires_at = max(task.expires_at, expires)
    await ctx.storage.finish(task_id)
    ctx.touch(task_id)
    if not await announce_source(ctx, task):
        logger.warning("no scheduler is reachable: cache task {} is on this host only", task_id[:12])
    holders = [ctx.host_id]
    if replicas > 1:
        holders += await _replicate(ctx, task, url, task.expires_at, replicas - 1)
    logger.info("cache task {} imported from {}, on {} hosts", task_id[:12], path, len(holders))
    return {"task_id": task_id, "url": url, "content_length": size, "expires_at": task.expires_at, "replicas": holders}


async def announce_source(ctx: CacheContext, task: Task) -> bool:
    """Register an imported task with its scheduler as the one who read it from its source
    (the file): the scheduler sends this peer back to source, so the strong digest of each
    piece it then reports is the task's authoritative one. A scheduler that knows the task
    already just hears that this peer holds it. False when no scheduler is reachable."""
    stub = await ctx.stub_for(task.id)
    if stub is None:
        return False
    peer = ctx.new_peer_id()
    req = DownloadRequest(
        url=task.url,
        tag=task.tag,
        application=task.application,
        content_for_calculating_task_id=task.url,
        need_back_to_source=True,
    )

    def msg(**kw: object) -> scheduler_pb2.AnnouncePeerRequest:
        return scheduler_pb2.AnnouncePeerRequest(host_id=ctx.host_id, task_id=task.id, peer_id=peer, **kw)

    call = stub.AnnouncePeer()
    try:
        await call.write(msg(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=req.to_proto(task))))
        resp = await call.read()
        if resp is not grpc.aio.EOF and resp.WhichOneof("response") == "need_back_to_source_response":
            await call.write(
                msg(download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest())
            )
            for record in sorted(task.pieces.values(), key=lambda r: r.number):
                piece = piece_to_proto(record, int(vortex.TrafficType.BACK_TO_SOURCE))
                piece.digest = strong_of(record) or record.digest
                finished = scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(piece=piece)
                await call.write(msg(download_piece_back_to_source_finished_request=finished))
            done = scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()
            await call.write(msg(download_peer_back_to_source_finished_request=done))
        else:
            await call.write(msg(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest()))
            await call.write(msg(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest()))
        await call.done_writing()
        await asyncio.wait_for(call.code(), 10)
        logger.info("cache task {} registered with the scheduler, {} pieces", task.id[:12], len(task.pieces))
    except grpc.aio.AioRpcError as exc:
        logger.warning("cannot register cache task {}: {}", task.id[:12], exc.details())
    except TimeoutError:
        logger.warning("cannot register cache task {}: the scheduler did not end the stream", task.id[:12])
    finally:
        call.cancel()
    return True


async def _replicate(ctx: CacheContext, task: Task, url: str, expires: float, count: int) -> list[str]:
    stub = await ctx.stub_for(task.id)
    if stub is None:
        raise Unavailable("no scheduler is reachable, so no replicas can be placed (use --replicas 1)")
    hosts = (await stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=10)).hosts
    others = sorted(
        (h for h in hosts if h.id != ctx.host_id), key=lambda h: hashlib.sha256((task.id + h.id).encode()).digest()
    )
    done: list[str] = []
    for host in others:
        if len(done) == count:
            break
        download = common_pb2.Download(
            url=url,
            type=common_pb2.TaskType.STANDARD,
            content_for_calculating_task_id=url,
            disable_back_to_source=True,
            request_header={CACHE_EXPIRES_HEADER: repr(expires)},
        )
        address = f"{host.ip}:{host.port}"
        try:
            call = dfdaemon_pb2_grpc.DfdaemonUploadStub(ctx.upload_channel(address)).DownloadTask(
                dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=600
            )
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            logger.warning("host {} could not take a replica of {}: {}", host.id, task.id[:12], exc.details())
            continue
        done.append(host.id)
    if len(done) < count:
        logger.warning("cache task {}: {} of {} replicas placed", task.id[:12], len(done), count)
    return done
