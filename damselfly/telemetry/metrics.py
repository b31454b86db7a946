"""Prometheus metrics, one registry per service, served at ``/metrics``."""

from __future__ import annotations

import socket
from bisect import bisect_left
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class LoopCounter:
    """A counter for one event loop's hot path: plain numbers, no lock (prometheus_client's
    Counter takes one on every ``inc``), read when ``/metrics`` is scraped. The same
    ``labels(...).inc()`` and ``inc()`` as a Counter, and the same exposition."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (), *, registry: CollectorRegistry):
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Count] = {}
        if not self.labelnames:
            self._children[()] = _Count()
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Count()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._children[()].inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class LoopHistogram:
    """A histogram for one event loop's hot path, as :class:`LoopCounter` is a counter:
    ``observe`` adds to plain numbers (prometheus_client's Histogram takes a lock for the sum
    and one for the bucket), read when ``/metrics`` is scraped; the same exposition."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], *, registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.bounds, value)] += 1

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        running, cumulative = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))
        family.add_metric([], cumulative, self.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


class DaemonMetrics:
    """Names follow Dragonfly's ``dragonfly_dfdaemon_*`` style."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "dragonfly_dfdaemon_"
        self.download_task = Counter(p + "download_task_total", "Downloads started.", ["type"], registry=r)
        self.download_task_failure = Counter(
            p + "download_task_failure_total", "Downloads failed.", ["type"], registry=r
        )
        self.download_traffic = Counter(
            p + "download_traffic_bytes_total",
            "Bytes downloaded, by where they came from.",
            ["traffic_type"],
            registry=r,
        )
        self.upload_traffic = Counter(p + "upload_traffic_bytes_total", "Piece bytes served to children.", registry=r)
        self.upload_pieces = Counter(p + "upload_piece_total", "Pieces served to children.", registry=r)
        self.endgame_fetches = Counter(
            p + "endgame_piece_total", "Second fetches of pieces already in flight (endgame).", registry=r
        )
        self.upload_busy = Counter(
            p + "upload_busy_total", "Piece requests answered busy (every upload slot taken).", registry=r
        )
        self.sync_pieces = Counter(
            p + "sync_piece_total",
            "Pieces on SyncPieces streams to children: announced, or skipped as the child's host holds them.",
            ["outcome"],
            registry=r,
        )
        self.piece_failures = Counter(
            p + "download_piece_failure_total", "Pieces that failed from a parent, by reason.", ["reason"], registry=r
        )
        self.piece_seconds = Histogram(
            p + "download_piece_duration_seconds",
            "Seconds to fetch one piece.",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.back_to_source = Counter(
            p + "back_to_source_total",
            "Downloads that read the origin, by why: scheduler (it said so), no_scheduler (none configured), "
            "scheduler_unreachable, parents_failed (the scheduler gone), local_file, share (a share of a "
            "shared read).",
            ["reason"],
            registry=r,
        )
        self.source_retries = Counter(
            p + "source_retry_total",
            "Reads of the origin tried again, by the status it answered.",
            ["status"],
            registry=r,
        )
        self.tasks = Gauge(p + "tasks", "Tasks held in storage.", registry=r)
        self.transport_traffic = Counter(
            p + "download_transport_bytes_total",
            "Piece bytes fetched from parents, by transport.",
            ["transport"],
            registry=r,
        )


class SchedulerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "dragonfly_scheduler_"
        # the counters a decision touches are LoopCounters: the scheduler runs on one event loop
        self.announce_peer = LoopCounter(p + "announce_peer_total", "AnnouncePeer streams opened.", registry=r)
        self.schedule = LoopCounter(p + "schedule_total", "Scheduling answers sent, by kind.", ("result",), registry=r)
        self.schedule_seconds = LoopHistogram(
            p + "schedule_duration_seconds",
            "Seconds from a register or reschedule to its answer.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.hosts = Gauge(p + "hosts", "Hosts announced.", ["type"], registry=r)
        self.tasks = Gauge(p + "tasks", "Tasks known.", registry=r)
        self.peers = Gauge(p + "peers", "Peers known.", registry=r)
        self.seed_triggers = Counter(p + "trigger_seed_peer_total", "Seed peers asked to fetch a task.", registry=r)
        self.seed_trigger_failures = Counter(
            p + "trigger_seed_peer_failure_total", "Seed peer downloads that failed.", registry=r
        )
        self.piece_reports = LoopCounter(
            p + "download_piece_total", "Pieces reported finished.", ("traffic_type",), registry=r
        )
        self.source_share_pieces = Counter(
            p + "source_share_pieces_total",
            "Pieces handed to peers to read from the source (scheduler.source_shares): planned, or handed on.",
            ["how"],
            registry=r,
        )
        self.refused = Counter(
            p + "refused_total",
            "Requests refused: over a cap (limit), not the caller's to make (permission), or a piece "
            "report whose digest the scheduler does not take (digest), or a register whose task id is not "
            "its Download's (task_id).",
            ["reason"],
            registry=r,
        )


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, extra: dict | None = None
) -> tuple[web.AppRunner, int]:
    """Start ``GET /metrics`` (and ``/healthy``) on host:port; returns the runner and bound port."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthy", healthy)
    for path, handler in (extra or {}).items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]
