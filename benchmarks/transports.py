"""Piece throughput of each transport plugin against the raw ceiling of its library.

    python benchmarks/transports.py [--transports tcp,tcp-tls,quic,webrtc] [--json]

For each transport, two processes on loopback: a parent that serves pieces through
the plugin's piece server, reading them from a file as a daemon does, and a child
that fetches them through the plugin's connections, ``--concurrency`` pieces at a
time, checking every piece's crc32 (the bytes are not written to disk, so storage
speed does not enter the figure). In the same run, the same two processes' worth
of the bare library moves the same number of bytes: ``socket.sendall`` for tcp, one
aioquic stream for quic, one aiortc data channel for webrtc, ``SSLSocket.sendall``
and ``recv_into`` with the same mutual-TLS contexts for ``tcp-tls`` (the tcp plugin
with ``security.tls``: a fresh CA and one certificate for 127.0.0.1); the two alternate
``--runs`` times and the medians are reported, since this machine's speed drifts
between runs. Peak RSS is the larger of the two plugin processes' high-water marks
(``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from damselfly.core.units import format_size, parse_size

MiB = 1 << 20
DEFAULT_SIZES = {"tcp": "2GiB", "tcp-tls": "1GiB", "quic": "256MiB", "webrtc": "64MiB"}
QUIC_OPTIONS = {"max_datagram_size": 8192}  # loopback: see the quic plugin's docs
TARGETS = {"tcp": 0.5, "tcp-tls": 0.5, "quic": 0.8, "webrtc": 0.8}
TLS_ENV = "DAMSELFLY_BENCH_TLS"  # the TLS files of tcp-tls, as JSON, for the spawned processes


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_transport(name: str) -> Any:
    from damselfly.config import PluginChoice, load_settings
    from damselfly.plugin_manager import build_plugins

    options = QUIC_OPTIONS if name == "quic" else {}
    transport = build_plugins(load_settings()).make_transport(PluginChoice(type=name.removesuffix("-tls"), **options))
    if name.endswith("-tls"):
        transport.security = _tls_security()
    return transport


def _tls_security() -> Any:
    from damselfly.config import SecurityConfig, TlsConfig

    return SecurityConfig(tls=TlsConfig(**json.loads(os.environ[TLS_ENV])))


def _make_certs(workdir: Path) -> None:
    from damselfly.testing.transport import tls_security

    if TLS_ENV not in os.environ:
        tls = tls_security(workdir / "tls").tls
        os.environ[TLS_ENV] = json.dumps({"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)})


# -- the plugin -----------------------------------------------------------------------


def _plugin_parent(name: str, path: str, piece: int, conn: Any) -> None:
    from damselfly.contracts import FileRegion, ServedPiece
    from damselfly.core import vortex
    from damselfly.core.piece import digest

    async def main() -> None:
        with open(path, "rb") as f:
            sample = f.read(piece)
        meta = {}

        async def lookup(task_id: str, number: int) -> ServedPiece:
            m = meta.setdefault(number, vortex.PieceMetadata(number, number * piece, piece, digest(sample)))
            return ServedPiece(m, region=FileRegion(Path(path), 0, piece))

        transport = _make_transport(name)
        transport.state_dir = Path(path).parent / "state"
        server = await transport.serve("127.0.0.1", 0, lookup)
        conn.send(server.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the child is done
        await server.close()

    asyncio.run(main())
    conn.send(_rss_mb())


def _plugin_child(port: int, name: str, pieces: int, piece: int, concurrency: int, conn: Any) -> None:
    from damselfly.daemon.pool import ConnectionPool
    from damselfly.testing.transport import Collector

    async def main() -> float:
        transport = _make_transport(name)
        pool = ConnectionPool([transport], 30)
        queue = list(range(pieces))
        addresses = {transport.name: f"127.0.0.1:{port}"}  # tcp-tls is the tcp plugin

        async def worker() -> None:
            while queue:
                number = queue.pop()
                key, c = await pool.acquire(addresses)
                try:
                    sink = Collector(piece, keep=False)
                    meta = await c.fetch("b" * 64, number, sink)
                    await sink.commit(meta.digest)
                finally:
                    await pool.release(key, c)

        await pool.acquire(addresses)  # connected before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        await pool.close()
        return seconds

    seconds = asyncio.run(main())
    conn.send((seconds, _rss_mb()))


# -- the bare libraries ------------------------------------------------------------------


def _raw_tcp_parent(total: int, conn: Any) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(srv.getsockname()[1])
    s, _ = srv.accept()
    block = os.urandom(MiB)
    for _ in range(total // MiB):
        s.sendall(block)
    s.close()
    conn.recv()
    conn.send(None)


def _raw_tcp_child(port: int, total: int, conn: Any) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(MiB))
    got, t0 = 0, time.perf_counter()
    while got < total:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    conn.send((time.perf_counter() - t0, got))


def _raw_tls_parent(total: int, conn: Any) -> None:
    from damselfly.security.tls import server_ssl_context

    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(srv.getsockname()[1])
    raw, _ = srv.accept()
    s = server_ssl_context(_tls_security().tls).wrap_socket(raw, server_side=True)
    block = os.urandom(MiB)
    for _ in range(total // MiB):
        s.sendall(block)
    s.close()
    conn.recv()
    conn.send(None)


def _raw_tls_child(port: int, total: int, conn: Any) -> None:
    from damselfly.security.tls import client_ssl_context

    raw = socket.create_connection(("127.0.0.1", port))
    s = client_ssl_context(_tls_security().tls).wrap_socket(raw, server_hostname="127.0.0.1")
    buf = memoryview(bytearray(MiB))
    got, t0 = 0, time.perf_counter()
    while got < total:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    conn.send((time.perf_counter() - t0, got))


def _raw_quic_parent(total: int, conn: Any) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration

    from damselfly.plugins.transport.quic import _load_chain, self_signed

    class Sender(QuicConnectionProtocol):
        def quic_event_received(self, event: events.QuicEvent) -> None:
            if isinstance(event, events.StreamDataReceived) and event.end_stream:
                block = os.urandom(MiB)
                for _ in range(total // MiB):
                    self._quic.send_stream_data(event.stream_id, block)
                self._quic.send_stream_data(event.stream_id, b"", end_stream=True)
                self.transmit()

    async def main() -> None:
        config = QuicConfiguration(is_client=False, alpn_protocols=["raw"], **_quic_sizes())
        _load_chain(config, *self_signed(None, ["127.0.0.1"]))
        server = await serve("127.0.0.1", 0, configuration=config, create_protocol=Sender)
        conn.send(server._transport.get_extra_info("sockname")[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        server.close()

    asyncio.run(main())
    conn.send(None)


def _quic_sizes() -> dict[str, int]:
    return {"max_datagram_size": QUIC_OPTIONS["max_datagram_size"]}


def _raw_quic_child(port: int, total: int, conn: Any) -> None:
    import ssl

    from aioquic.asyncio import QuicConnectionProtocol, connect
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration

    class Receiver(QuicConnectionProtocol):
        got = 0
        done: asyncio.Event

        def quic_event_received(self, event: events.QuicEvent) -> None:
            if isinstance(event, events.StreamDataReceived):
                Receiver.got += len(event.data)
                if event.end_stream:
                    Receiver.done.set()

    async def main() -> float:
        Receiver.done = asyncio.Event()
        config = QuicConfiguration(is_client=True, alpn_protocols=["raw"], verify_mode=ssl.CERT_NONE, **_quic_sizes())
        async with connect("127.0.0.1", port, configuration=config, create_protocol=Receiver) as client:
            t0 = time.perf_counter()
            sid = client._quic.get_next_available_stream_id()
            client._quic.send_stream_data(sid, b"go", end_stream=True)
            client.transmit()
            await Receiver.done.wait()
            return time.perf_counter() - t0

    seconds = asyncio.run(main())
    conn.send((seconds, Receiver.got))


def _raw_webrtc(role: str, total: int, conn: Any) -> None:
    """Both ends of a bare aiortc data channel; SDP goes over ``conn``."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from damselfly.plugins.transport.webrtc import _HOST_ADDRESSES, WebrtcConfig, _patch_aioice, _rtc_configuration

    async def main() -> tuple[float, int]:
        _patch_aioice()
        _HOST_ADDRESSES.set(["127.0.0.1"])
        pc = RTCPeerConnection(configuration=_rtc_configuration(WebrtcConfig()))
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[tuple[float, int]] = loop.create_future()
        if role == "parent":
            channel = pc.createDataChannel("raw")
            opened = loop.create_future()
            channel.on("open", lambda: opened.set_result(None))
            await pc.setLocalDescription(await pc.createOffer())
            conn.send((pc.localDescription.sdp, pc.localDescription.type))
            sdp, kind = await loop.run_in_executor(None, conn.recv)
            await pc.setRemoteDescription(RTCSessionDescription(sdp, kind))
            await opened
            low = asyncio.Event()
            channel.bufferedAmountLowThreshold = 512 * 1024
            channel.on("bufferedamountlow", low.set)
            block = os.urandom(60 * 1024)
            sent = 0
            while sent < total:
                if channel.bufferedAmount > MiB:
                    low.clear()
                    await low.wait()
                channel.send(block[: min(len(block), total - sent)])
                sent += min(len(block), total - sent)
            await loop.run_in_executor(None, conn.recv)  # the child has it all
            await pc.close()
            return 0.0, sent
        state = {"got": 0, "t0": 0.0}

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            state["t0"] = time.perf_counter()

            @channel.on("message")
            def on_message(message: bytes) -> None:
                state["got"] += len(message)
                if state["got"] >= total and not finished.done():
                    finished.set_result((time.perf_counter() - state["t0"], state["got"]))

        sdp, kind = await loop.run_in_executor(None, conn.recv)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, kind))
        await pc.setLocalDescription(await pc.createAnswer())
        conn.send((pc.localDescription.sdp, pc.localDescription.type))
        result = await finished
        await pc.close()
        return result

    conn.send(asyncio.run(main()))


# -- running them ------------------------------------------------------------------------


def _pair(parent: Any, parent_args: tuple[Any, ...], child: Any, child_args: tuple[Any, ...]) -> tuple[Any, Any]:
    """Start ``parent``, hand its first message (a port) to ``child``, return both processes' last messages."""
    ctx = mp.get_context("spawn")
    p_here, p_there = ctx.Pipe()
    c_here, c_there = ctx.Pipe()
    pp = ctx.Process(target=parent, args=(*parent_args, p_there))
    pp.start()
    port = p_here.recv()
    cp = ctx.Process(target=child, args=(port, *child_args, c_there))
    cp.start()
    child_result = c_here.recv()
    p_here.send("done")
    parent_result = p_here.recv()
    for proc in (cp, pp):
        proc.join(60)
    return parent_result, child_result


def _webrtc_pair(total: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    p_here, p_there = ctx.Pipe()
    c_here, c_there = ctx.Pipe()
    pp = ctx.Process(target=_raw_webrtc, args=("parent", total, p_there))
    cp = ctx.Process(target=_raw_webrtc, args=("child", total, c_there))
    pp.start()
    cp.start()
    c_here.send(p_here.recv())  # offer
    p_here.send(c_here.recv())  # answer
    result = c_here.recv()
    p_here.send("done")
    p_here.recv()
    for proc in (cp, pp):
        proc.join(60)
    return result


def _raw_mb_per_s(name: str, moved: int) -> float:
    if name == "tcp":
        _, (seconds, got) = _pair(_raw_tcp_parent, (moved,), _raw_tcp_child, (moved,))
    elif name == "tcp-tls":
        _, (seconds, got) = _pair(_raw_tls_parent, (moved,), _raw_tls_child, (moved,))
    elif name == "quic":
        _, (seconds, got) = _pair(_raw_quic_parent, (moved,), _raw_quic_child, (moved,))
    else:
        seconds, got = _webrtc_pair(moved)
    return got / seconds / 1e6


def measure(name: str, total: int, piece: int, concurrency: int, runs: int, workdir: Path) -> dict[str, Any]:
    """Plugin and bare library alternately, ``runs`` times each: medians, and the highest RSS."""
    path = workdir / f"{name}.piece"
    if name.endswith("-tls"):
        _make_certs(workdir)
    path.write_bytes(os.urandom(piece))
    pieces = max(1, total // piece)
    moved = pieces * piece
    speeds, raws, parent_rss, child_rss = [], [], 0.0, 0.0
    for _ in range(runs):
        p_rss, (seconds, c_rss) = _pair(
            _plugin_parent, (name, str(path), piece), _plugin_child, (name, pieces, piece, concurrency)
        )
        speeds.append(moved / seconds / 1e6)
        parent_rss, child_rss = max(parent_rss, p_rss or 0), max(child_rss, c_rss)
        raws.append(_raw_mb_per_s(name, moved))
    mb_per_s, raw = statistics.median(speeds), statistics.median(raws)
    return {
        "bytes": moved,
        "piece_length": piece,
        "concurrency": concurrency,
        "runs": runs,
        "mb_per_s": round(mb_per_s, 1),
        "raw_mb_per_s": round(raw, 1),
        "ratio": round(mb_per_s / raw, 3),
        "target_ratio": TARGETS.get(name),
        "peak_rss_mb": round(max(parent_rss, child_rss), 1),
        "parent_rss_mb": round(parent_rss, 1),
        "child_rss_mb": round(child_rss, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="tcp,quic,webrtc")
    ap.add_argument("--piece", default="16MiB", help="Piece length.")
    ap.add_argument("--concurrency", type=int, default=4, help="Pieces in flight.")
    ap.add_argument("--runs", type=int, default=3, help="Runs of each, plugin and bare library alternately.")
    ap.add_argument("--size", action="append", default=[], help="NAME=SIZE, e.g. quic=128MiB.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = {**DEFAULT_SIZES, **dict(s.split("=", 1) for s in args.size)}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="damselfly-bench-") as tmp:
        for name in args.transports.split(","):
            size = parse_size(sizes[name])
            results[name] = measure(name, size, parse_size(args.piece), args.concurrency, args.runs, Path(tmp))
    out = {"machine": f"{platform.node()} {os.cpu_count()} cpus, Python {platform.python_version()}", **results}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'transport':10} {'moved':>9} {'MB/s':>8} {'raw MB/s':>9} {'ratio':>6} {'target':>6} {'peak RSS':>9}")
    for name, r in results.items():
        print(
            f"{name:10} {format_size(r['bytes']):>9} {r['mb_per_s']:>8} {r['raw_mb_per_s']:>9} "
            f"{r['ratio']:>6} {r['target_ratio']:>6} {r['peak_rss_mb']:>7} MB"
        )


if __name__ == "__main__":
    main()
