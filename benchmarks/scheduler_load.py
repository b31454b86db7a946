"""The scheduler under 10,000 peers: scheduling decisions per second, decision latency, RSS.

    python benchmarks/scheduler_load.py [--peers 10000] [--hosts 1000] [--tasks 100]
                                        [--concurrency 64] [--schedulers 1] [--server native]
                                        [--client native] [--framing own] [--nice 10] [--floor]
                                        [--json]

The real scheduler service runs as its own process (``damselfly scheduler``); this
script drives it over gRPC like daemons would. It announces ``--hosts`` hosts, then
runs ``--peers`` peers (each host downloads ``peers / hosts`` of the ``--tasks``
tasks), ``--concurrency`` at a time. Each peer opens an AnnouncePeer stream and:

- registers (a task whose length and piece layout are known) and waits for the
  scheduler's answer: parents, or go back to the source (the first peer of a task,
  as there is no seed);
- reports it started, then four finished pieces (from its parents, or from the source);
- one peer in ten asks to be rescheduled and waits for the new answer;
- reports it finished, and the stream ends; the peer stays in the scheduler's
  state as a parent for the peers that come later.

A decision is one answer to a register or reschedule request; its latency is
from the request being written to the answer being read, as the daemon sees it.
The load generator shares the machine's cores with the scheduler; it lowers its own
priority (``--nice``, 10) once the schedulers run, so that they get a core first when
both want one, as they would on machines of their own. With
``--schedulers K``, K scheduler processes share the tasks the way daemons spread
them (rendezvous hashing of the task id, ``damselfly.daemon.schedulers.scheduler_order``),
and every host announces itself to each.

The scheduler serves gRPC with ``--server`` (``native``: damselfly.rpc's server, its default;
``grpcio``), and the load speaks it through ``--client`` (damselfly.rpc's client or grpcio's).
With ``--floor`` the same load drives, in place of the scheduler, a servicer that
keeps no state and answers every register or reschedule with one fixed parent:
what the gRPC server alone allows on this machine, the ceiling for the scheduler on it.
``--framing h2`` puts hyper-h2 under the native server in place of its own HTTP/2 framing
(the variant in ``rpc_framing.py``, which compares the two; it needs ``pip install h2``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import duration_pb2, empty_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damselfly.daemon.schedulers import scheduler_order
from damselfly.rpc import Connection, RpcError, Server
from damselfly.rpc.wire import download_task_id

PIECE = 4 * 1024 * 1024
PIECES = 64
COST = duration_pb2.Duration(nanos=50_000_000)
END_WAIT = 60.0  # seconds run() waits for the scheduler to end the streams written to their end
FINISHED = "download_piece_finished_request"
SOURCE_FINISHED = "download_piece_back_to_source_finished_request"
TRAFFIC = {FINISHED: common_pb2.TrafficType.REMOTE_PEER, SOURCE_FINISHED: common_pb2.TrafficType.BACK_TO_SOURCE}


class Driver:
    """The load: hosts announce themselves, then peers run their downloads' messages.

    It speaks gRPC through ``damselfly.rpc``'s client (``--client native``, the default)
    or through grpcio's (``--client grpcio``); the messages are the same either way.
    """

    def __init__(self, addresses: list[str], hosts: int, tasks: int, channels: int, client: str = "native"):
        # separate connections, so one HTTP/2 connection's flow control is not the limit
        self.addresses = addresses
        self.client = client
        self.n_channels = channels
        self.channels: dict[str, list[Any]] = {}
        self.hosts = [f"host-{i:04d}" for i in range(hosts)]
        # each task's id is its Download's, as a daemon computes it (the scheduler takes no other);
        # daemons spread tasks over schedulers by a prefix of it
        urls = [f"http://origin.example/{i}" for i in range(tasks)]
        self.task_urls = {download_task_id(common_pb2.Download(url=u)): u for u in urls}
        self.tasks = list(self.task_urls)
        self.latencies: list[float] = []
        self.answers: dict[str, int] = {}
        self.errors: list[str] = []
        self.open_streams = 0  # written to the end, the scheduler's end not read yet
        self.all_ended: asyncio.Future[None] | None = None
        self.cpu_seconds = 0.0
        self._template_cache: dict[str, dict[str, bytes]] = {}
        self._scheduler_of: dict[str, str] = {}
        self._piece_parts: dict[tuple[str, int | str], bytes] = {}

    async def connect(self) -> None:
        for a in self.addresses:
            if self.client == "grpcio":
                self.channels[a] = [
                    grpc.aio.insecure_channel(a, options=[("grpc.primary_user_agent", f"load-{i}")])
                    for i in range(self.n_channels)
                ]
            else:
                host, _, port = a.rpartition(":")
                self.channels[a] = [await Connection.open(host, int(port)) for _ in range(self.n_channels)]

    def channel(self, i: int, task_id: str = "", address: str = "") -> Any:
        """The connection a daemon would use for ``task_id`` (or for ``address``)."""
        if not address:
            address = self._scheduler_of.get(task_id, "")
            if not address:
                address = self._scheduler_of[task_id] = scheduler_order(self.addresses, task_id)[0]
        channels = self.channels[address]
        return channels[i % len(channels)]

    async def announce_hosts(self) -> None:
        async def one(i: int, host_id: str) -> None:
            host = common_pb2.Host(
                id=host_id,
                type=0,
                hostname=host_id,
                ip=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                port=4000,
                download_port=4000,
            )
            host.network.idc = f"idc-{i % 4}"
            host.network.location = f"region|zone-{i % 8}|rack-{i % 32}"
            host.network.max_tx_bandwidth = 10_000_000_000
            request = scheduler_pb2.AnnounceHostRequest(host=host, interval=duration_pb2.Duration(seconds=300))
            for address in self.addresses:  # a daemon announces itself to every scheduler
                ch = self.channel(i, address=address)
                if self.client == "grpcio":
                    await scheduler_pb2_grpc.SchedulerStub(ch).AnnounceHost(request, timeout=30)
                else:
                    await ch.unary(ANNOUNCE_HOST, request.SerializeToString(), timeout=30)

        for start in range(0, len(self.hosts), 100):
            await asyncio.gather(*(one(i, h) for i, h in enumerate(self.hosts[start : start + 100], start)))

    def _templates(self, task_id: str) -> dict[str, bytes]:
        """The parts of a peer's requests that are the same for every peer of a task, serialized.
        A request is its peer's ids followed by one of these: protobuf reads concatenated
        encodings as one message, so the load generator builds little per message."""
        t = self._template_cache.get(task_id)
        if t is None:
            R = scheduler_pb2.AnnouncePeerRequest
            download = common_pb2.Download(
                url=self.task_urls[task_id],
                type=common_pb2.TaskType.STANDARD,
                actual_content_length=PIECE * PIECES,
                actual_piece_length=PIECE,
                actual_piece_count=PIECES,
            )
            messages = {
                "register": R(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download)),
                "started": R(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest()),
                "finished": R(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest()),
                "source_started": R(
                    download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest()
                ),
                "source_finished": R(
                    download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()
                ),
            }
            t = self._template_cache[task_id] = {k: v.SerializeToString() for k, v in messages.items()}
        return t

    def _piece_part(self, field: str, key: int | str) -> bytes:
        """A piece report's request with only the piece's ``key`` (its number, or its
        parent's id) and what follows from it, serialized once."""
        part = self._piece_parts.get((field, key))
        if part is None:
            request = scheduler_pb2.AnnouncePeerRequest()
            pb = getattr(request, field).piece
            if isinstance(key, str):
                pb.parent_id = key
            else:
                pb.number, pb.offset, pb.length, pb.digest = key, key * PIECE, PIECE, "crc32:1"
                pb.traffic_type = TRAFFIC[field]
                pb.cost.CopyFrom(COST)
            part = self._piece_parts[(field, key)] = request.SerializeToString()
        return part

    async def peer(self, n: int) -> None:
        host_id = self.hosts[n % len(self.hosts)]
        task_id = self.tasks[(n // len(self.hosts) + n) % len(self.tasks)]
        peer_id = f"10.0.0.1-{host_id}-peer-{n:06d}"
        ids = scheduler_pb2.AnnouncePeerRequest(host_id=host_id, task_id=task_id, peer_id=peer_id).SerializeToString()
        t = self._templates(task_id)
        call = _Call(self.channel(n, task_id), self.client)

        async def decide(request: bytes) -> scheduler_pb2.AnnouncePeerResponse:
            t0 = time.perf_counter()
            await call.write(request)
            resp = await call.read()
            self.latencies.append(time.perf_counter() - t0)
            if resp is None:
                raise RuntimeError("the scheduler ended the stream")
            kind = resp.WhichOneof("response")
            self.answers[kind] = self.answers.get(kind, 0) + 1
            return resp

        def piece(number: int, parent_id: str, field: str) -> bytes:
            # the piece's fields and its parent in two encodings of the same request, which
            # protobuf merges into one (a message field that appears twice is merged)
            return ids + self._piece_part(field, number) + self._piece_part(field, parent_id)

        try:
            resp = await decide(ids + t["register"])
            if resp.WhichOneof("response") == "normal_task_response":
                parents = [p.id for p in resp.normal_task_response.candidate_parents]
                await call.write(ids + t["started"])
                if random.random() < 0.1:
                    request = scheduler_pb2.AnnouncePeerRequest()
                    request.reschedule_peer_request.description = "load test"
                    for pid in parents[:1]:
                        request.reschedule_peer_request.candidate_parents.add(id=pid)
                    resp = await decide(ids + request.SerializeToString())
                    parents = [p.id for p in resp.normal_task_response.candidate_parents] or parents
                rest = [
                    piece((n + k) % PIECES, parents[k % len(parents)] if parents else "", FINISHED) for k in range(4)
                ]
                await call.write_all([*rest, ids + t["finished"]])
            else:
                rest = [piece(k, "", SOURCE_FINISHED) for k in range(4)]
                await call.write_all([ids + t["source_started"], *rest, ids + t["source_finished"]])
            await call.done_writing()
        except (grpc.aio.AioRpcError, RpcError, RuntimeError) as exc:
            self.errors.append(str(exc))
            return
        # the stream's end is the scheduler's business: the next peer need not wait for it
        self.open_streams += 1
        call.on_end(self._ended)

    def _ended(self, error: str | None) -> None:
        if error is not None:
            self.errors.append(error)
        self.open_streams -= 1
        if self.open_streams == 0 and self.all_ended is not None and not self.all_ended.done():
            self.all_ended.set_result(None)

    async def run(self, peers: int, concurrency: int) -> float:
        queue = iter(range(peers))

        async def worker() -> None:
            for n in queue:
                await self.peer(n)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if self.open_streams:
            self.all_ended = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.all_ended, END_WAIT)
            except TimeoutError:
                raise SystemExit(f"{self.open_streams} streams did not end within {END_WAIT:.0f}s") from None
        self.cpu_seconds = time.process_time() - c0
        return time.perf_counter() - t0

    async def close(self) -> None:
        for channels in self.channels.values():
            for ch in channels:
                if self.client == "grpcio":
                    await ch.close()
                else:
                    ch.close()


def _ignore(message: object) -> None:
    pass


_DRAINING: set[asyncio.Future[None]] = set()  # grpcio's streams read to their end
ANNOUNCE_HOST = "/scheduler.v2.Scheduler/AnnounceHost"
ANNOUNCE_PEER = "/scheduler.v2.Scheduler/AnnouncePeer"


class _Call:
    """One AnnouncePeer stream through either client."""

    def __init__(self, channel: Any, client: str):
        self.native = client != "grpcio"
        if self.native:
            self.stream = channel.stream(ANNOUNCE_PEER)
        else:
            self.call = scheduler_pb2_grpc.SchedulerStub(channel).AnnouncePeer()

    async def write(self, request: bytes) -> None:
        await self.write_all([request])

    async def write_all(self, requests: list[bytes]) -> None:
        """Each request in its own message (and DATA frame), in order."""
        if self.native:
            send = self.stream.send
            for r in requests:
                send(r)  # queued; the event loop flushes it
        else:
            for r in requests:
                await self.call.write(scheduler_pb2.AnnouncePeerRequest.FromString(r))

    async def read(self) -> scheduler_pb2.AnnouncePeerResponse | None:
        if self.native:
            data = await self.stream.recv()
            return None if data is None else scheduler_pb2.AnnouncePeerResponse.FromString(data)
        resp = await self.call.read()
        return None if resp is grpc.aio.EOF else resp

    def on_end(self, callback: Callable[[str | None], None]) -> None:
        """``callback(None)`` once the scheduler ended the stream with OK (after answers
        nobody reads any more), ``callback(error)`` otherwise; for damselfly.rpc's client with no
        task per stream."""
        if not self.native:
            task = asyncio.ensure_future(self._read_to_end(callback))
            _DRAINING.add(task)
            task.add_done_callback(_DRAINING.discard)
            return
        st = self.stream
        st.messages.listen(_ignore, lambda: callback(f"status {st.status}: {st.details}" if st.status else None))
        # a connection lost ends the messages with an error and no on_end: run() then says
        # how many streams never ended

    async def _read_to_end(self, callback: Callable[[str | None], None]) -> None:
        try:
            while await self.read() is not None:
                pass
        except grpc.aio.AioRpcError as exc:
            callback(str(exc))
            return
        callback(None)

    async def done_writing(self) -> None:
        if self.native:
            self.stream.end()
        else:
            await self.call.done_writing()


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


class FloorServicer(scheduler_pb2_grpc.SchedulerServicer):
    """No state, no scheduling: one fixed answer to each register or reschedule."""

    ANSWER = scheduler_pb2.AnnouncePeerResponse(
        normal_task_response=scheduler_pb2.NormalTaskResponse(
            candidate_parents=[common_pb2.Peer(id="10.0.0.1-host-0000-peer-000000")]
        )
    )

    async def AnnounceHost(self, request: object, context: object) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def AnnouncePeer(self, request_iterator: Any, context: object) -> Any:
        async for req in request_iterator:
            if req.WhichOneof("request") in ("register_peer_request", "reschedule_peer_request"):
                yield self.ANSWER


async def serve_floor(ready: str, kind: str, framing: str = "own") -> None:
    if framing == "h2":
        import rpc_framing

        rpc_framing.install()
    server: Any = Server() if kind == "native" else grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(FloorServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = f"{ready}.tmp"
    Path(tmp).write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    os.replace(tmp, ready)
    await server.wait_for_termination()


def start_scheduler(
    work: Path, name: str = "scheduler", floor: bool = False, server: str = "native", framing: str = "own"
) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    ready = work / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
    env.update(
        {
            "DAMSELFLY_LOG__LEVEL": "WARNING",
            "DAMSELFLY_PLUGINS__AUTOLOAD": "false",
            "DAMSELFLY_SCHEDULER__GRPC_SERVER": server,
        }
    )
    command = [sys.executable, "-m", "damselfly", "scheduler", "--ready-file", str(ready)]
    if framing == "h2":  # damselfly, with hyper-h2 under its gRPC server
        command[1:3] = [str(Path(__file__).with_name("rpc_framing.py")), "serve"]
    if floor:
        command = [sys.executable, __file__, "--serve-floor", str(ready), "--server", server, "--framing", framing]
    with (work / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the scheduler did not start: {(work / f'{name}.log').read_text()[-500:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=1_000)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64, help="peers in flight at once")
    ap.add_argument("--channels", type=int, default=4, help="connections to each scheduler")
    ap.add_argument(
        "--schedulers", type=int, default=1, help="scheduler processes; tasks spread over them as daemons spread them"
    )
    ap.add_argument(
        "--server",
        choices=["native", "grpcio"],
        default="native",
        help="what serves gRPC in the scheduler (its scheduler.grpc_server setting) and in the floor",
    )
    ap.add_argument("--client", choices=["native", "grpcio"], default="native", help="the load generator's gRPC client")
    ap.add_argument(
        "--framing",
        choices=["own", "h2"],
        default="own",
        help="the native server's HTTP/2 framing: damselfly.rpc.framing, or hyper-h2 (rpc_framing.py)",
    )
    ap.add_argument(
        "--floor", action="store_true", help="drive a stateless servicer instead: the ceiling the gRPC server sets"
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=10,
        help="the load generator's niceness: the schedulers get the cores first, as on machines of their own",
    )
    ap.add_argument("--serve-floor", metavar="READY_FILE", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.serve_floor:
        asyncio.run(serve_floor(args.serve_floor, args.server, args.framing))
        return

    work = Path(tempfile.mkdtemp(prefix="dfload-"))
    started = [
        start_scheduler(work, f"scheduler{i}", args.floor, args.server, args.framing) for i in range(args.schedulers)
    ]
    if args.nice:
        os.nice(args.nice)  # after the schedulers started: they keep the default priority
    try:
        scheds = [psutil.Process(proc.pid) for proc, _ in started]
        driver: Driver | None = None

        async def go() -> float:
            nonlocal driver
            addresses = [str(info["address"]) for _, info in started]
            driver = Driver(addresses, args.hosts, args.tasks, args.channels, args.client)
            try:
                await driver.connect()
                await driver.announce_hosts()
                return await driver.run(args.peers, args.concurrency)
            finally:
                await driver.close()

        cpu0 = [s.cpu_times() for s in scheds]
        seconds = asyncio.run(go())
        cpu1 = [s.cpu_times() for s in scheds]
        rss = max(s.memory_info().rss for s in scheds)
    finally:
        for proc, _ in started:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    assert driver is not None
    lat = driver.latencies
    result = {
        "peers": args.peers,
        "hosts": args.hosts,
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "decisions": len(lat),
        "seconds": round(seconds, 2),
        "decisions_per_second": round(len(lat) / seconds, 1),
        "p50_ms": round(quantile(lat, 0.5) * 1000, 2),
        "p99_ms": round(quantile(lat, 0.99) * 1000, 2),
        "rss_mb": round(rss / 1e6, 1),
        "schedulers": args.schedulers,
        "floor": args.floor,
        "server": args.server,
        "client": args.client,
        "framing": args.framing,
        "scheduler_cpu_seconds": round(
            sum((b.user + b.system) - (a.user + a.system) for a, b in zip(cpu0, cpu1, strict=True)), 1
        ),
        "scheduler_system_cpu_seconds": round(sum(b.system - a.system for a, b in zip(cpu0, cpu1, strict=True)), 1),
        "each_scheduler_cpu_seconds": [
            round((b.user + b.system) - (a.user + a.system), 1) for a, b in zip(cpu0, cpu1, strict=True)
        ],
        "load_cpu_seconds": round(driver.cpu_seconds, 1),
        "load_nice": args.nice,
        "channels": args.channels,
        "answers": driver.answers,
        "errors": len(driver.errors),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    if driver.errors:
        result["first_error"] = driver.errors[0]
    print(
        f"{'peers':>7} {'decisions':>9} {'per s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7}\n"
        f"{args.peers:>7} {len(lat):>9} {result['decisions_per_second']:>8} {result['p50_ms']:>7} "
        f"{result['p99_ms']:>7} {result['rss_mb']:>7}"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
