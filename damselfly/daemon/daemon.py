"""The peer daemon: local clients on a unix socket, peers over gRPC and Vortex.

One process holds a storage, a piece server per transport, the
``DfdaemonUpload`` gRPC server, the ``DfdaemonDownload`` server on the unix
socket, ``/metrics``, and an announcer that keeps the schedulers told of this
host's load, and tells a scheduler new to it (a restart, one back after failing) the
finished tasks it holds, so that a restarted scheduler rebuilds its state from the daemons.

``Daemon`` composes the parts: each (``local``, ``upload``, ``proxy``, ``gc``,
``cache``) is handed a context of exactly what it uses, and none imports this module.
"""

from __future__ import annotations

import asyncio
import functools
import platform
import time
from dataclasses import replace
from urllib.parse import urlsplit

import grpc
import psutil
from dragonfly_api import common_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loguru import logger

from damselfly import __version__
from damselfly.config import Settings
from damselfly.contracts import PieceServer, ServedPiece, Transport, strong_of
from damselfly.core import ids, vortex
from damselfly.core.errors import InvalidArgument, StorageError, Unavailable
from damselfly.core.host import Host, HostType
from damselfly.core.piece import covers
from damselfly.core.task import Task, TaskState
from damselfly.daemon.cache import CacheContext, import_file
from damselfly.daemon.context import GRPC_OPTIONS, LocalOpener
from damselfly.daemon.download import Downloader
from damselfly.daemon.download_context import DownloadContext
from damselfly.daemon.gc import Collector, GcContext
from damselfly.daemon.local import LocalContext, LocalService, admin_handler
from damselfly.daemon.localfiles import socket_gid
from damselfly.daemon.localrelay import LocalRelay
from damselfly.daemon.offers import Offers
from damselfly.daemon.pool import ConnectionPool
from damselfly.daemon.proxy import Proxy
from damselfly.daemon.proxyswarm import ProxyContext
from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.runtime import TaskBoard, TaskRuntime
from damselfly.daemon.schedulers import SchedulerPool
from damselfly.daemon.upload import UploadContext, UploadService, UploadSlots, lookup_piece
from damselfly.plugin_manager import Plugins, build_plugins
from damselfly.rpc.wire import host_to_proto, piece_to_proto
from damselfly.security import tls
from damselfly.security.admission import Origin, admit, admitted, reads_this_node
from damselfly.security.policy import SourcePolicy
from damselfly.telemetry.metrics import DaemonMetrics, serve_metrics


class Daemon:
    """One peer (or seed) daemon: ``start`` opens its servers, ``stop`` closes them."""

    def __init__(self, settings: Settings, plugins: Plugins | None = None):
        self.settings = settings
        self.plugins = plugins or build_plugins(settings)
        cfg = settings.daemon
        self.is_seed = cfg.seed
        self.host_id = ids.host_id(settings.host.ip, settings.host.hostname, seed=cfg.seed)
        self.metrics = DaemonMetrics()
        self.storage = self.plugins.make_storage(cfg.storage, cfg.data_dir)
        self.transports = self._usable_transports()
        self.picker = self.plugins.make_picker(cfg.piece_picker)
        self.pool = ConnectionPool(self.transports, cfg.piece_connect_timeout)
        self.schedulers = SchedulerPool(cfg.schedulers, cfg.scheduler_connect_timeout, settings.security.tls)
        self.download_context = DownloadContext(  # what each download sees
            host_id=self.host_id,
            is_seed=self.is_seed,
            config=cfg,
            piece_digest=settings.security.piece_digest,
            storage=self.storage,
            plugins=self.plugins,
            metrics=self.metrics,
            pool=self.pool,
            picker=self.picker,
            schedulers=self.schedulers,
            new_peer_id=self.new_peer_id,
            upload_channel=self.upload_channel,
            scheduler_lost=self.scheduler_lost,
            offer_pieces=self.offer_pieces,
            announce_finished=self.announce_finished,
            spawn=self._spawn,
        )
        self.board = TaskBoard()
        # a super-seeding seed's offers: per task, and the SyncPieces streams they wake
        self.offers = Offers(
            cfg.seed and cfg.super_seed, offer_timeout=cfg.offer_timeout, per_child=cfg.offers_per_child
        )
        self.upload_slots = UploadSlots()  # pieces being sent to children now
        self.gc = Collector(GcContext(self.storage, self.board, self.delete_task), cfg.gc, cfg.data_dir)
        self.piece_port = 0
        self.piece_addresses: dict[str, str] = {}  # transport name -> the address children use
        self.upload_port = 0
        self.metrics_port = 0
        self.proxy: Proxy | None = None
        self.socket_path = settings.socket_path
        self.source_policy = SourcePolicy.from_config(settings.security.sources)
        self._piece_servers: list[PieceServer] = []
        self._upload_server: grpc.aio.Server | None = None
        self._local_server: grpc.aio.Server | None = None
        self.local_relay: LocalRelay | None = None  # the public socket: tells the local server who calls
        self._metrics_runner: object = None
        self._background: set[asyncio.Task[None]] = set()
        self._announce_now = asyncio.Event()  # a scheduler went away: AnnounceHost again at once
        self._telling: dict[str, asyncio.Task[None]] = {}  # scheduler -> its re-announcement of stored tasks
        self._upload_channels: dict[str, grpc.aio.Channel] = {}
        self._last_load = (time.monotonic(), 0)
        self._tx_rate = 0
        self.upload_context = self._upload_context()  # what the upload service and the piece servers see

    # -- what each part sees -------------------------------------------------------------

    def _upload_context(self) -> UploadContext:
        cfg = self.settings.daemon
        return UploadContext(
            host_id=self.host_id,
            ip=self.settings.host.ip,
            storage=self.storage,
            board=self.board,
            metrics=self.metrics,
            offers=self.offers,
            slots=self.upload_slots,
            slot_limit=cfg.upload_slots,
            slot_wait=cfg.upload_wait,
            piece_addresses=self.piece_addresses,
            tls_enabled=self.settings.security.tls.enabled,
            served=self.gc.served,
            start_download=self.start_download,
            delete_task=self.delete_task,
            core_host=self.core_host,
        )

    def _local_context(self, relay: LocalRelay) -> LocalContext:
        """What the unix-socket services see: ``relay`` tells them who calls."""
        cache = CacheContext(
            host_id=self.host_id,
            storage=self.storage,
            piece_digest=self.settings.security.piece_digest,
            touch=self.gc.touch,
            new_peer_id=self.new_peer_id,
            stub_for=self.schedulers.stub_for,
            upload_channel=self.upload_channel,
        )
        return LocalContext(
            host_id=self.host_id,
            storage=self.storage,
            source_policy=self.source_policy,
            source_for=self.plugins.source_for,
            make_source=self.plugins.make_source,
            caller_of=relay.caller_of,
            socket_group=self.settings.security.socket_group,
            start_download=self.start_download,
            delete_task=self.delete_task,
            touch=self.gc.touch,
            stat_remote=functools.partial(self.schedulers.stat_task, self.host_id),
            collect=self.gc.collect,
            import_cache=functools.partial(import_file, cache),
            timeline=self.board.timeline,
        )

    def _proxy_context(self) -> ProxyContext:
        """What the proxy sees (its GETs through the swarm)."""
        return ProxyContext(
            storage=self.storage,
            start_download=self.start_download,
            touch=self.gc.touch,
            stat_remote=functools.partial(self.schedulers.stat_task, self.host_id),
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.settings.daemon
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data dir {cfg.data_dir}: {exc.strerror}") from None
        await self.storage.open()
        self.metrics.tasks.set(len(self.storage.tasks()))

        uploads = self.upload_context

        async def lookup(task_id: str, number: int) -> ServedPiece:
            return await lookup_piece(uploads, task_id, number)

        for i, transport in enumerate(self.transports):
            transport.state_dir = cfg.data_dir / "transport" / transport.name
            server = await transport.serve(cfg.listen_ip, cfg.piece_port if i == 0 else 0, lookup)
            self._piece_servers.append(server)
            self.piece_addresses[transport.name] = transport.served_address(server, self.settings.host.ip)
        self.piece_port = self._piece_servers[0].port

        # other hosts reach the upload server: mutual TLS when configured (the caller's certificate
        # must name the address it calls from), else a loud warning unless it is bound to loopback
        tls_config = self.settings.security.tls
        tls.warn_unauthenticated("the daemon (upload gRPC, piece server)", cfg.listen_ip, tls_config)
        streams = ("grpc.max_concurrent_streams", self.settings.security.limits.grpc_max_streams)  # per connection
        self._upload_server = grpc.aio.server(
            options=[*GRPC_OPTIONS, streams], interceptors=tls.server_interceptors(tls_config)
        )
        dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(UploadService(uploads), self._upload_server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._upload_server)
        self.upload_port = tls.add_port(self._upload_server, f"{cfg.listen_ip}:{cfg.upload_port}", tls_config)
        if not self.upload_port:
            raise OSError(f"cannot bind the upload server to {cfg.listen_ip}:{cfg.upload_port}")
        await self._upload_server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        # the server listens in a directory only the daemon reaches; clients use the relay's socket,
        # which has its mode before it is reachable and tells the server each caller's uid and gid
        sec = self.settings.security
        gid = socket_gid(sec.socket_group) if sec.socket_group else -1
        self.local_relay = LocalRelay(self.socket_path, cfg.data_dir / "local", sec.socket_mode, gid)
        local = self._local_context(self.local_relay)
        self._local_server = grpc.aio.server(options=GRPC_OPTIONS)
        dfdaemon_pb2_grpc.add_DfdaemonDownloadServicer_to_server(LocalService(local), self._local_server)
        self._local_server.add_generic_rpc_handlers((admin_handler(local),))
        local_health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(local_health, self._local_server)
        self._local_server.add_insecure_port(self.local_relay.upstream)
        await self._local_server.start()
        await self.local_relay.start()
        await local_health.set("", health_pb2.HealthCheckResponse.SERVING)

        if self.settings.proxy.enabled:
            self.proxy = Proxy(self._proxy_context(), self.settings.proxy, self.settings.security)
            await self.proxy.start(cfg.listen_ip)
        self._metrics_runner, self.metrics_port = await serve_metrics(
            self.metrics.registry, cfg.listen_ip, cfg.metrics_port
        )
        self._spawn(self._announce_loop())
        self._spawn(self._gc_loop())
        logger.info(
            "daemon {} ready: socket {}, upload :{}, pieces {}, metrics :{}",
            self.host_id,
            self.socket_path,
            self.upload_port,
            ", ".join(f"{name} {addr}" for name, addr in self.piece_addresses.items()),
            self.metrics_port,
        )

    async def stop(self) -> None:
        for t in list(self._background):
            t.cancel()
        for rt in self.board.all_running():
            if rt.runner is not None:
                rt.runner.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.schedulers.addresses:
            await self.schedulers.delete_host(self.host_id)
        if self.proxy is not None:
            await self.proxy.stop()
        for server in (self._local_server, self._upload_server):
            if server is not None:
                await server.stop(0.5)
        if self.local_relay is not None:
            await self.local_relay.close()
        for piece_server in self._piece_servers:
            await piece_server.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()  # type: ignore[attr-defined]
        await self.pool.close()
        await self.schedulers.close()
        for ch in self._upload_channels.values():
            await ch.close()
        await self.storage.close()
        self.socket_path.unlink(missing_ok=True)

    def _usable_transports(self) -> list[Transport]:
        """The configured transports this host can run, in order; the others are logged and skipped."""
        usable = []
        for choice in self.settings.daemon.transports:
            try:
                transport = self.plugins.make_transport(choice)
            except Unavailable as exc:
                logger.warning("transport {} is skipped, using the next one: {}", choice.type, exc)
                continue
            transport.security = self.settings.security
            usable.append(transport)
        if not usable:
            names = ", ".join(c.type for c in self.settings.daemon.transports)
            raise Unavailable(f"none of the configured transports ({names}) can run on this host")
        return usable

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        t = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return t

    # -- host and load ----------------------------------------------------------------

    def core_host(self) -> Host:
        h = self.settings.host
        now = time.monotonic()
        then, sent = self._last_load
        if now - then >= 1.0:
            uploaded = self.upload_slots.sent_bytes
            self._tx_rate = int((uploaded - sent) / (now - then))
            self._last_load = (now, uploaded)
        return Host(
            id=self.host_id,
            ip=h.ip,
            hostname=h.hostname,
            port=self.upload_port,
            type=HostType.SUPER_SEED if self.is_seed else HostType.NORMAL,
            download_port=self.upload_port,
            idc=h.idc,
            location=h.location,
            max_tx_bandwidth=h.max_tx_bandwidth * 8,
            tx_bandwidth=self._tx_rate * 8,
        )

    def host_proto(self) -> common_pb2.Host:
        pb = host_to_proto(self.core_host())
        if self.proxy is not None:
            pb.proxy_port = self.proxy.port
        proc = psutil.Process()
        vm = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self.settings.daemon.data_dir))
        pb.os = platform.system().lower()
        pb.platform = platform.system().lower()
        pb.kernel_version = platform.release()
        pb.cpu.CopyFrom(
            common_pb2.CPU(
                logical_count=psutil.cpu_count() or 0,
                physical_count=psutil.cpu_count(logical=False) or 0,
                percent=psutil.cpu_percent(interval=None),
                process_percent=proc.cpu_percent(interval=None),
            )
        )
        pb.memory.CopyFrom(
            common_pb2.Memory(
                total=vm.total,
                available=vm.available,
                used=vm.used,
                used_percent=vm.percent,
                free=vm.free,
                process_used_percent=proc.memory_percent(),
            )
        )
        pb.disk.CopyFrom(common_pb2.Disk(total=disk.total, free=disk.free, used=disk.used, used_percent=disk.percent))
        pb.network.max_rx_bandwidth = self.settings.host.max_rx_bandwidth * 8
        pb.build.CopyFrom(common_pb2.Build(git_version=__version__, platform=platform.machine()))
        pb.name = self.settings.host.hostname
        return pb

    # seconds between AnnounceHost tries to a scheduler that does not answer, at most
    ANNOUNCE_RETRY_MAX = 5.0

    async def _announce_loop(self) -> None:
        """AnnounceHost to every scheduler each ``announce_interval``, at once when one went away,
        and again and again (backing off) to those that do not answer; a scheduler new to this
        daemon (see :mod:`damselfly.daemon.schedulers`) is told the stored tasks it should know."""
        if not self.schedulers.addresses:
            return
        for address in self.schedulers.addresses:
            self._spawn(self._watch_scheduler(address))
        interval = self.settings.daemon.announce_interval
        delay = 0.2
        retry: list[str] | None = None  # None: a round to all of them
        next_round = 0.0
        while True:
            self._announce_now.clear()
            if retry is None:
                next_round = time.monotonic() + interval
            _, failed = await self.schedulers.announce_host(self.host_proto(), interval, retry)
            for address in failed:
                self.scheduler_lost(address, wake=False)
            for address in self.schedulers.take_new():
                self._tell_stored_tasks(address)
            if len(failed) == len(self.schedulers.addresses):
                logger.warning("no scheduler accepted AnnounceHost; retrying")
            wait = next_round - time.monotonic()
            if failed:
                wait, delay = min(wait, delay), min(delay * 2, self.ANNOUNCE_RETRY_MAX, interval)
            else:
                delay = 0.2
            try:
                await asyncio.wait_for(self._announce_now.wait(), max(wait, 0.0))
                retry = None
            except TimeoutError:
                retry = failed if failed and time.monotonic() < next_round else None

    async def _watch_scheduler(self, address: str) -> None:
        """Wake the announce loop whenever the connection to ``address`` drops: a scheduler
        restarted on its address learns of this host (and what it holds) within seconds."""
        while True:
            await self.schedulers.connection_lost(address)
            logger.info("connection to scheduler {} dropped; announcing to it again", address)
            self._announce_now.set()

    def _tell_stored_tasks(self, address: str) -> None:
        """Announce to ``address`` the stored tasks it should know, one run at a time (a new one
        replaces a run still going)."""
        running = self._telling.pop(address, None)
        if running is not None:
            running.cancel()
        t = self._telling[address] = self._spawn(self._announce_stored_tasks(to=address))

        def forget(done: asyncio.Task[None]) -> None:
            if self._telling.get(address) is done:
                del self._telling[address]

        t.add_done_callback(forget)

    async def _announce_stored_tasks(self, lost: str | None = None, to: str | None = None) -> None:
        """Tell the schedulers which finished tasks this daemon can serve: those whose scheduler is
        ``to`` now (new to this daemon: after a start or its restart; a download running now is
        told when it ends, as its stream to the scheduler may have broken), or those whose
        scheduler was ``lost`` (they belong to the next one now); ``reannounce_rate`` a second at most."""
        running = {rt.runner: rt.task_id for rt in self.board.all_running() if rt.runner is not None} if to else {}
        if not await self._announce_tasks(self.storage.tasks(), lost, to):
            return
        if running:
            await asyncio.wait(running)  # (never cancels them)
            stored = (self.storage.get(task_id) for task_id in set(running.values()))
            await self._announce_tasks([t for t in stored if t is not None], lost, to)

    async def _announce_tasks(self, tasks: list[Task], lost: str | None, to: str | None) -> bool:
        """Announce the finished ``tasks`` that ``lost``'s or ``to``'s are; False when no scheduler answers."""
        gap = 1.0 / self.settings.daemon.reannounce_rate
        for task in tasks:
            if task.state is not TaskState.SUCCEEDED or self.board.running(task.id):
                continue
            if reads_this_node(urlsplit(task.url).scheme):
                continue  # this node's own files are never offered to the swarm
            if lost is not None and self.schedulers.order(task.id)[0] != lost:
                continue
            if to is not None and self.schedulers.preference(task.id)[0] != to:
                continue
            if not await self.announce_finished(task):
                return False
            await asyncio.sleep(gap)
        return True

    def scheduler_lost(self, address: str, *, wake: bool = True) -> None:
        """A scheduler stopped answering: mark it down, move its finished tasks to the next one,
        and (``wake``) AnnounceHost again at once, so that it hears of this host as soon as it is back."""
        if self.schedulers.mark_down(address):
            logger.warning("scheduler {} does not answer; its tasks go to the next scheduler", address)
            self._spawn(self._announce_stored_tasks(lost=address))
            if wake:
                self._announce_now.set()

    def new_peer_id(self) -> str:
        """A fresh peer id of this host's."""
        return ids.peer_id(self.settings.host.ip, self.settings.host.hostname, seed=self.is_seed)

    async def announce_finished(self, task: Task) -> bool:
        """Register a finished task with its scheduler (``metadata_only``); False when none is reachable."""
        stub = await self.schedulers.stub_for(task.id)
        if stub is None:
            return False
        peer = self.new_peer_id()
        req = announce_request(task)
        if req is None:
            logger.warning("stored task {} is not announced: its task id cannot be derived again", task.id[:12])
            return True
        download = req.to_proto(task)
        download.metadata_only = True

        def msg(**kw: object) -> scheduler_pb2.AnnouncePeerRequest:
            return scheduler_pb2.AnnouncePeerRequest(host_id=self.host_id, task_id=task.id, peer_id=peer, **kw)

        call = stub.AnnouncePeer()
        try:
            await call.write(msg(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download)))
            await call.read()
            if self.is_seed:
                # A seed read these pieces from the source: a scheduler that has just started (a
                # failover, a restart) learns their digests from it, so children can check them.
                for record in sorted(task.pieces.values(), key=lambda r: r.number):
                    piece = piece_to_proto(record, int(vortex.TrafficType.BACK_TO_SOURCE))
                    piece.digest = strong_of(record) or record.digest
                    finished = scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(piece=piece)
                    await call.write(msg(download_piece_back_to_source_finished_request=finished))
            await call.write(msg(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest()))
            await call.done_writing()
            await call.read()
            logger.info("announced stored task {} to the scheduler", task.id[:12])
        except grpc.aio.AioRpcError as exc:
            logger.warning("cannot announce stored task {}: {}", task.id[:12], exc.details())
        finally:
            call.cancel()
        return True

    # -- downloads ----------------------------------------------------------------------

    async def start_download(
        self,
        req: DownloadRequest,
        *,
        origin: Origin = Origin.LOCAL,
        member: bool = False,
        open_local: LocalOpener | None = None,
    ) -> TaskRuntime:
        """Start (or join) the download of ``req``'s task; progress arrives on the runtime.

        ``origin`` says where the request came from: the admission point decides which
        sources it may use and with whose credentials (PermissionDenied when it may not;
        see :mod:`damselfly.security.admission`); ``member``: the caller proved with a
        certificate that it belongs to the cluster; ``open_local``: how its local files are
        opened (as the local caller, where that is not the daemon's own user)."""
        req = admit(req, origin, self.source_policy, member=member)
        task_id = req.task_id()
        held = self.storage.get(task_id)
        if origin in (Origin.SCHEDULER, Origin.UPLOAD) and held is not None and held.state is TaskState.SUCCEEDED:
            # asked over the upload API (a seed trigger) for a task it holds: register it with its
            # scheduler now, so that children are handed this peer instead of waiting for it
            self._spawn(self.announce_finished(held))
        for rt in self.board.running(task_id):
            if covers(rt.range, req.range):
                return rt  # a running download already brings every byte asked for
        rt = TaskRuntime(task_id, range=req.range)
        self.board.add(rt)
        downloader = Downloader(self.download_context, req, rt)
        # the download, and every source it makes, acts for it
        with admitted(origin, self.source_policy, open_local):
            rt.runner = self._spawn(downloader.run())
        rt.runner.add_done_callback(lambda _: self.board.remove(rt))
        return rt

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.daemon.gc.interval)
            try:
                await self.gc.collect()
            except Exception as exc:  # a failed round is logged; the next one tries again
                logger.warning("garbage collection failed: {}", exc)

    async def delete_task(self, task_id: str) -> None:
        for rt in self.board.forget(task_id):
            if rt.runner is not None:
                rt.runner.cancel()
        await self.storage.delete(task_id)
        self.offers.forget(task_id)
        self.metrics.tasks.set(len(self.storage.tasks()))
        await self.schedulers.delete_task(self.host_id, task_id)

    @property
    def uploading(self) -> int:
        """Pieces being sent to children now."""
        return self.upload_slots.used

    def offer_pieces(self, task: Task) -> None:
        """On a super-seeding seed: offer what can be offered, and wake the streams of the children told."""
        self.offers.offer(task)

    def upload_channel(self, address: str) -> grpc.aio.Channel:
        ch = self._upload_channels.get(address)
        if ch is None:
            # mutual TLS when configured: the other daemon's certificate must name ``address``
            ch = self._upload_channels[address] = tls.grpc_channel(address, self.settings.security.tls, GRPC_OPTIONS)
        return ch


def announce_request(task: Task) -> DownloadRequest | None:
    """A request whose task id is ``task``'s, from what the store keeps of it: the scheduler takes
    a register only under its Download's own task id. The ways a task id is made from a request
    are tried in turn; None when none gives it back (a Hugging Face revision is not kept, nor a
    source endpoint a request named: such a task is not re-announced)."""
    base = DownloadRequest(
        url=task.url,
        tag=task.tag,
        application=task.application,
        filtered_query_params=list(task.filtered_query_params),
    )
    blob = ids.parse_blob_url(task.url)
    candidates = [
        base,
        replace(base, piece_length=task.piece_length),
        replace(base, content_for_calculating_task_id=task.url),  # a persistent cache task
        replace(base, use_blob_digest=True),
    ]
    if blob is not None:  # a blob of a pull with credentials, bound to its registry and repository
        bound = ids.bound_blob_content(*urlsplit(task.url)[:2], blob)
        candidates.append(replace(base, content_for_calculating_task_id=bound))
    for req in candidates:
        try:
            if req.task_id() == task.id:
                return req
        except InvalidArgument:
            continue
    return None
