"""Preheat: the scheduler puts an image's layers (or a file) on chosen hosts before anyone asks.

``PreheatImage`` resolves the image through the registry (tag, index and platform,
Bearer or Basic auth), then has every target host download each blob through
``DfdaemonUpload.DownloadTask``: seeds from the registry, other hosts through the
swarm. Scopes: ``single_seed_peer`` (default; the first seed), ``all_seed_peers``,
``all_peers``; ``ips`` narrows the targets, ``count`` caps them. It answers once
every blob is on every target, or fails with the first error. Image blobs are
always tasks by their digest (as the proxy fetches them), whatever
``enable_task_id_based_blob_digest`` says. ``StatImage`` tells
per layer whether it is cached anywhere and, per host, which layers it holds.
``PreheatFile``/``StatFile`` do the same for one URL.

Credentials (the registry's Authorization, secret headers of the request) go only to
the seeds that read the source, and only over mutual TLS (``security.tls``); every other
target, and every target without TLS, gets the request without them.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from loguru import logger

from damselfly.config import Settings
from damselfly.core import ids
from damselfly.core.errors import BackendError, DamselflyError, InvalidArgument, PermissionDenied
from damselfly.core.host import Host
from damselfly.core.peer import PeerState
from damselfly.oci.distribution import Reference, RegistryClient, Resolved
from damselfly.rpc.wire import public_headers, redact_url
from damselfly.scheduler.state import SchedulerState
from damselfly.security import tls
from damselfly.security.policy import SourcePolicy, policy_connector

SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")


def targets(hosts: list[Host], scope: str, ips: list[str], count: int) -> list[Host]:
    scope = scope or "single_seed_peer"
    if scope not in SCOPES:
        raise InvalidArgument(f"unknown preheat scope {scope!r} ({', '.join(SCOPES)})")
    seeds = sorted((h for h in hosts if h.is_seed), key=lambda h: h.id)
    others = sorted((h for h in hosts if not h.is_seed), key=lambda h: h.id)
    chosen = seeds[:1] if scope == "single_seed_peer" else seeds if scope == "all_seed_peers" else seeds + others
    if ips:
        chosen = [h for h in chosen if h.ip in ips]
    if count:
        chosen = chosen[:count]
    if not chosen:
        raise InvalidArgument(f"no host matches preheat scope {scope!r}" + (f" and ips {ips}" if ips else ""))
    return chosen


async def resolve_image(req: Any, settings: Settings) -> tuple[Reference, Resolved]:
    """The image's manifest, read by the scheduler itself: through the source policy, which
    checks every address it connects to (redirects included), like any source read."""
    ref = Reference.parse(req.url)
    timeout = aiohttp.ClientTimeout(total=120)
    ssl = False if req.insecure_skip_verify else None
    policy = SourcePolicy.from_config(settings.security.sources)
    policy.check_url(f"{ref.scheme}://{ref.registry}/")
    connector = policy_connector(policy, ssl=ssl)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        client = RegistryClient(session, req.username, req.password)
        return ref, await client.resolve(ref, req.platform or "linux/amd64")


def channel_to(address: str, settings: Settings) -> grpc.aio.Channel:
    """A channel to a daemon's upload API: mutual TLS when ``security.tls`` is set."""
    return tls.grpc_channel(address, settings.security.tls)


async def _download_on(host: Host, download: common_pb2.Download, timeout: float, settings: Settings) -> None:
    address = f"{host.ip}:{host.port}"
    async with channel_to(address, settings) as channel:
        call = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel).DownloadTask(
            dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=timeout
        )
        async for _ in call:
            pass


async def preheat(
    state: SchedulerState, settings: Settings, urls: list[str], req: Any, headers: dict[str, str], blob_digest: bool
) -> None:
    hosts = targets(list(state.hosts.values()), req.scope, list(req.ips), req.count)
    timeout = req.timeout.ToSeconds() if req.HasField("timeout") and req.timeout.ToSeconds() > 0 else 3600
    limit = asyncio.Semaphore(max(1, req.concurrent_task_count or 4))
    # seeds first: the other hosts then find each blob in the swarm
    waves = [[h for h in hosts if h.is_seed], [h for h in hosts if not h.is_seed]]
    # the credentials only to a seed that reads the source, and only over mutual TLS
    public = public_headers(headers)
    secure = settings.security.tls.enabled
    if len(public) < len(headers) and not secure:
        logger.warning("preheat: the request's credentials are not sent to any host without security.tls")

    credentialed = len(public) < len(headers)

    async def one(host: Host, url: str) -> None:
        download = common_pb2.Download(
            url=url,
            type=common_pb2.TaskType.STANDARD,
            tag=req.tag,
            application=req.application,
            filtered_query_params=list(req.filtered_query_params),
            request_header=headers if host.is_seed and secure else public,
            piece_length=req.piece_length or 0,
            enable_task_id_based_blob_digest=blob_digest,
            need_back_to_source=host.is_seed,
        )
        if req.priority:
            download.priority = req.priority
        bound = bound_content(url, blob_digest, credentialed)
        if bound:  # a private blob is a task of its registry and repository, as the proxy makes it
            download.content_for_calculating_task_id = bound
        async with limit:
            try:
                await _download_on(host, download, timeout, settings)
            except grpc.aio.AioRpcError as exc:
                hint = "" if secure or len(public) == len(headers) else " (credentials need security.tls)"
                raise BackendError(f"preheat of {url} on {host.id} failed: {exc.details()}{hint}") from None
            logger.info("preheated {} on {}", redact_url(url), host.id)

    for wave in waves:
        await asyncio.gather(*(one(h, u) for h in wave for u in urls))


def bound_content(url: str, blob_digest: bool, credentialed: bool) -> str:
    """The ``content_for_calculating_task_id`` of a blob fetched with credentials: bound to its
    registry and repository (``ids.bound_blob_content``), never the digest-only id that anonymous
    pulls share, which holds only public bytes; '' for anything else."""
    blob = ids.parse_blob_url(url) if blob_digest and credentialed else None
    return ids.bound_blob_content(*urlsplit(url)[:2], blob) if blob is not None else ""


def task_id_for(url: str, req: Any, blob_digest: bool, credentialed: bool = False) -> str:
    bound = bound_content(url, blob_digest, credentialed)
    if bound:
        return ids.keyed_task_id(bound)
    if blob_digest and ids.blob_digest(url):
        return ids.blob_task_id(url)
    return ids.task_id(
        url,
        tag=req.tag or None,
        application=req.application or None,
        piece_length=req.piece_length or None,
        filtered_query_params=list(req.filtered_query_params) or list(ids.DEFAULT_FILTERED_QUERY_PARAMS),
    )


def holders(st: SchedulerState, task_id: str) -> list[Host]:
    """Hosts with a finished peer of the task (a normal host's unchecked ``metadata_only`` claim
    only once the scheduler has every piece's digest, as for a parent)."""
    entry = st.tasks.get(task_id)
    if entry is None:
        return []
    out = []
    for pid in entry.task.peer_ids:
        p = st.peers.get(pid)
        if p is None or p.state is not PeerState.SUCCEEDED or p.host_id not in st.hosts:
            continue
        h = st.hosts[p.host_id]
        if p.metadata_only and not h.is_seed and not entry.digests_complete:
            continue
        out.append(h)
    return out


async def preheat_image(
    state: SchedulerState, settings: Settings, request: Any, context: grpc.aio.ServicerContext
) -> None:
    try:
        ref, image = await resolve_image(request, settings)
        urls = [ref.blob_url(image.config)] + [ref.blob_url(d) for d, _ in image.layers]
        headers = dict(request.header)
        if image.authorization:
            headers["Authorization"] = image.authorization
        await preheat(state, settings, urls, request, headers, True)
    except DamselflyError as exc:
        await _abort(context, exc)


async def stat_image(state: SchedulerState, settings: Settings, request: Any, context: grpc.aio.ServicerContext) -> Any:
    try:
        ref, image = await resolve_image(request, settings)
    except DamselflyError as exc:
        await _abort(context, exc)
    urls = [ref.blob_url(image.config)] + [ref.blob_url(d) for d, _ in image.layers]
    blob_digest = True
    credentialed = bool(image.authorization) or len(public_headers(dict(request.header))) < len(request.header)
    by_host: dict[str, tuple[Host, list[str]]] = {}
    layers = []
    for url in urls:
        have = holders(state, task_id_for(url, request, blob_digest, credentialed))
        layers.append(scheduler_pb2.Layer(url=url, is_finished=bool(have)))
        for h in have:
            by_host.setdefault(h.id, (h, []))[1].append(url)
    peers = []
    for h, cached in by_host.values():
        layers_here = [scheduler_pb2.Layer(url=u, is_finished=True) for u in cached]
        peers.append(scheduler_pb2.PeerImage(ip=h.ip, hostname=h.hostname, cached_layers=layers_here))
    return scheduler_pb2.StatImageResponse(image=scheduler_pb2.Image(layers=layers), peers=peers)


async def preheat_file(
    state: SchedulerState, settings: Settings, request: Any, context: grpc.aio.ServicerContext
) -> None:
    try:
        if not request.url:
            raise InvalidArgument("PreheatFile needs a url")
        await preheat(state, settings, [request.url], request, dict(request.header), False)
    except DamselflyError as exc:
        await _abort(context, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: DamselflyError) -> None:
    status = exc.status_code if isinstance(exc, BackendError) else 0
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidArgument) else grpc.StatusCode.UNAVAILABLE
    if status in (401, 403) or isinstance(exc, PermissionDenied):
        code = grpc.StatusCode.PERMISSION_DENIED
    elif status == 404:
        code = grpc.StatusCode.NOT_FOUND
    await context.abort(code, str(exc))
