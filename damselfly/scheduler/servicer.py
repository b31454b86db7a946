"""The scheduler: ``scheduler.v2.Scheduler`` over gRPC, from the dragonfly-api stubs.

It keeps hosts, tasks and peers in memory (``state``), decides for each peer whether it
gets parents or goes to the source (``scheduling``), and makes a seed peer fetch a new task
from the origin so that the origin is read once. Parent ranking is a strategy plugin. This
module is the gRPC door: each method checks who asks (``access``) and hands the work to the
room that does it; an AnnouncePeer stream is a ``session``.

Trust (docs/security.md): a request's credentials (Authorization, Cookie,
Proxy-Authorization, X-Amz-* headers, the sources' tokens and keys) are stripped when a
peer registers, so no task, StatTask, answer or log holds them; only the seed trigger
hands them on, to the one seed and over mutual TLS. A piece's digest is taken only from
whoever the scheduler sent to the source (a seed's wins). A peer registers only under its
Download's own task id (``wire.download_task_id``), and a task id its request chose with
``content_for_calculating_task_id`` is never handed to a seed. With ``security.tls`` every
caller shows a certificate of the cluster CA and acts only for its own hosts; caps
(``security.limits``) bound hosts, tasks and peers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loguru import logger

from damselfly.config import Settings
from damselfly.plugin_manager import Plugins, build_plugins
from damselfly.rpc import RequestStream, Server, ServicerContext, callback_form
from damselfly.rpc.wire import BOOT_METADATA, host_from_proto, offers_source_shares, peer_to_proto, task_to_proto
from damselfly.scheduler import preheat
from damselfly.scheduler.access import Access
from damselfly.scheduler.answers import Answers, Encoded, ScheduleError
from damselfly.scheduler.scheduling import Scheduling
from damselfly.scheduler.session import CLOSE, Outbox, PeerSession, StreamOut
from damselfly.scheduler.shares import SourceReads
from damselfly.scheduler.state import SchedulerState
from damselfly.security import tls
from damselfly.telemetry.metrics import SchedulerMetrics, serve_metrics

# AnnounceHost's trailer naming this process: a daemon that sees it change tells the new
# process again what it holds (damselfly.daemon.schedulers reads it)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, settings: Settings, plugins: Plugins, metrics: SchedulerMetrics):
        self.settings = settings
        self.cfg = settings.scheduler
        self.metrics = metrics
        self.state = SchedulerState(settings, plugins.make_strategy(self.cfg.strategy))
        self.answers = Answers()
        self.scheduling = Scheduling(settings, self.state, self.answers, metrics)
        self.shares = SourceReads(self.scheduling)
        self.access = Access(settings, self.state, metrics)
        self.boot = uuid.uuid4().hex  # this process: state is lost with it
        # the gauges are read when /metrics is scraped (not on every change: O(hosts) each)
        st = self.state
        metrics.hosts.labels("seed").set_function(lambda: sum(1 for h in st.hosts.values() if h.is_seed))
        metrics.hosts.labels("normal").set_function(lambda: sum(1 for h in st.hosts.values() if not h.is_seed))
        metrics.tasks.set_function(lambda: len(st.tasks))
        metrics.peers.set_function(lambda: len(st.peers))

    def session(self, out: Outbox | StreamOut, context: ServicerContext | grpc.aio.ServicerContext) -> PeerSession:
        """The session of one AnnouncePeer stream."""
        shares_ok = offers_source_shares(context.invocation_metadata())
        return PeerSession(self.scheduling, self.shares, self.access, out, shares_ok=shares_ok, context=context)

    # -- hosts ---------------------------------------------------------------------

    async def AnnounceHost(
        self, request: scheduler_pb2.AnnounceHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        pb = request.host
        if not pb.id or not pb.ip or not pb.port:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host needs id, ip and port")
        try:
            ident = self.access.identity(context)
            if ident is not None:
                self.access.check_announce(ident, pb)
            self.access.check_room(hosts=pb.id)
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))
        now = time.time()
        host = host_from_proto(pb, now)
        if request.interval.seconds:
            host.interval = request.interval.seconds
        old = self.state.hosts.get(pb.id)
        if old is not None:
            host.peer_ids = old.peer_ids
            host.upload_content_length = old.upload_content_length
            host.concurrent_upload_pieces = old.concurrent_upload_pieces
        self.state.hosts[pb.id] = host
        self.answers.announced.put(host, pb)
        logger.debug("host {} announced ({}:{}, seed={})", pb.id, pb.ip, pb.port, host.is_seed)
        context.set_trailing_metadata(((BOOT_METADATA, self.boot),))
        return empty_pb2.Empty()

    async def ListHosts(
        self, request: scheduler_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListHostsResponse:
        return scheduler_pb2.ListHostsResponse(
            hosts=[self.answers.host_as_announced(h) for h in self.state.hosts.values()]
        )

    async def DeleteHost(
        self, request: scheduler_pb2.DeleteHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._owner_only(context, request.host_id, "DeleteHost")
        self.state.remove_host(request.host_id)
        return empty_pb2.Empty()

    async def gc(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.host_gc_interval)
            self.state.collect(time.time())

    # -- tasks and peers -------------------------------------------------------------

    async def _operator_only(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Abort unless the caller's certificate has an operator's role (anyone may without TLS)."""
        try:
            self.access.check_operator(self.access.identity(context), what)
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))

    async def _owner_only(self, context: grpc.aio.ServicerContext, host_id: str, what: str) -> None:
        """Abort unless the caller may act for ``host_id`` (anyone may without TLS)."""
        try:
            self.access.check_owner(self.access.identity(context), host_id, what)
        except ScheduleError as exc:
            await context.abort(exc.code, str(exc))

    async def PreheatImage(
        self, request: scheduler_pb2.PreheatImageRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._operator_only(context, "PreheatImage")
        await preheat.preheat_image(self.state, self.settings, request, context)
        return empty_pb2.Empty()

    async def StatImage(
        self, request: scheduler_pb2.StatImageRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.StatImageResponse:
        return await preheat.stat_image(self.state, self.settings, request, context)  # type: ignore[no-any-return]

    async def PreheatFile(
        self, request: scheduler_pb2.PreheatFileRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._operator_only(context, "PreheatFile")
        await preheat.preheat_file(self.state, self.settings, request, context)
        return empty_pb2.Empty()

    async def StatTask(
        self, request: scheduler_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        e = self.state.tasks.get(request.task_id)
        if e is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return task_to_proto(e.task)

    async def DeleteTask(
        self, request: scheduler_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._owner_only(context, request.host_id, "DeleteTask")
        e = self.state.tasks.get(request.task_id)
        if e is not None:
            for pid in list(e.task.peer_ids):
                p = self.state.peers.get(pid)
                if p is not None and p.host_id == request.host_id:
                    self.state.remove_peer(pid)
        return empty_pb2.Empty()

    async def StatPeer(
        self, request: scheduler_pb2.StatPeerRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Peer:
        p = self.state.peers.get(request.peer_id)
        if p is None or p.task_id != request.task_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"peer {request.peer_id} not found")
        return peer_to_proto(p, self.state.hosts[p.host_id], self.state.tasks[p.task_id].task)

    async def DeletePeer(
        self, request: scheduler_pb2.DeletePeerRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        p = self.state.peers.get(request.peer_id)
        if p is None:
            return empty_pb2.Empty()
        await self._owner_only(context, p.host_id, "DeletePeer")
        self.state.remove_peer(request.peer_id)
        return empty_pb2.Empty()

    # -- the announce stream -------------------------------------------------------------

    def _announce_peer_callbacks(self, requests: RequestStream, context: ServicerContext) -> None:
        """AnnouncePeer on damselfly.rpc's server: each request handled as it is read, each
        answer written as it is made, and no task for the stream."""
        self.metrics.announce_peer.inc()
        session = self.session(StreamOut(context), context)
        context.add_done_callback(lambda _: session.close())
        requests.listen(session.on_request, session.on_requests_end)

    @callback_form(_announce_peer_callbacks)
    async def AnnouncePeer(
        self, request_iterator: AsyncIterator[scheduler_pb2.AnnouncePeerRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.AnnouncePeerResponse]:
        self.metrics.announce_peer.inc()
        out = Outbox()  # (grpcio) a task reads the requests, this generator yields the answers
        session = self.session(out, context)
        reader = asyncio.get_running_loop().create_task(session.consume(request_iterator))
        try:
            while True:
                item = await out.get()
                if item is CLOSE:
                    return
                if isinstance(item, ScheduleError):
                    await context.abort(item.code, str(item))
                yield item.message if type(item) is Encoded else item  # type: ignore[union-attr,misc]
        finally:
            reader.cancel()
            session.close()


async def start_scheduler(settings: Settings, plugins: Plugins | None = None) -> SchedulerServer:
    plugins = plugins or build_plugins(settings)
    metrics = SchedulerMetrics()
    service = SchedulerService(settings, plugins, metrics)
    cfg = settings.scheduler
    tls_cfg = settings.security.tls
    server: grpc.aio.Server | Server
    if cfg.grpc_server == "native":
        server = Server(max_streams=settings.security.limits.grpc_max_streams)
    else:  # (with TLS, an interceptor checks each caller's certificate names its address)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=tls.server_interceptors(tls_cfg))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # mutual TLS when security.tls is set: every caller shows a certificate of the cluster CA
    port = tls.add_port(server, _address(cfg.listen_ip, cfg.port), tls_cfg)
    if port == 0:
        raise OSError(f"cannot bind the scheduler to {cfg.listen_ip}:{cfg.port}")
    tls.warn_unauthenticated("the scheduler", cfg.listen_ip, tls_cfg)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    runner, metrics_port = await serve_metrics(metrics.registry, cfg.listen_ip, cfg.metrics_port)
    gc = asyncio.get_running_loop().create_task(service.gc())
    service.scheduling.spawn(service.scheduling.refresh_periodically())
    logger.info("scheduler serving on {}:{} (metrics :{})", cfg.listen_ip, port, metrics_port)
    return SchedulerServer(server, service, runner, gc, f"{cfg.listen_ip}:{port}", metrics_port)


def _address(ip: str, port: int) -> str:
    """host:port, an IPv6 address in brackets."""
    try:
        return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"
    except ValueError:
        return f"{ip}:{port}"


@dataclass
class SchedulerServer:
    server: grpc.aio.Server | Server
    service: SchedulerService
    metrics_runner: object
    gc: asyncio.Task[None]
    address: str
    metrics_port: int

    async def stop(self, grace: float = 1.0) -> None:
        self.gc.cancel()
        for t in list(self.service.scheduling.background):
            t.cancel()
        await self.server.stop(grace)
        await self.metrics_runner.cleanup()  # type: ignore[attr-defined]
