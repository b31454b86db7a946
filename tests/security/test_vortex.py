"""Vortex under attack: mutual TLS on every piece listener, and the bounds a child cannot pass.

Every test drives a real piece server on 127.0.0.1 (TCP, QUIC, WebRTC's signalling,
RDMA's endpoint exchange over the in-process fabric) with a real client: the plugin's
own, or a raw socket where the attacker would not use ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from damselfly.config import LimitsConfig, SecurityConfig, TlsConfig
from damselfly.contracts import ServedPiece, Transport
from damselfly.core import vortex
from damselfly.core.errors import NotFound, PeerError
from damselfly.core.piece import digest
from damselfly.plugins.transport.quic import QuicConfig, QuicTransport
from damselfly.plugins.transport.tcp import TcpTransport
from damselfly.security.certs import CA_CERT, init_ca, issue
from damselfly.testing.transport import TASK_ID, Collector, piece_bytes
from tests.helpers.waiting import wait_for

PIECE = piece_bytes(1, 256 * 1024)


class Calls:
    """A lookup that serves piece 1 and counts the requests that reached it."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, task_id: str, number: int) -> ServedPiece:
        self.count += 1
        if number != 1:
            raise NotFound(f"piece {number} is not here")
        return ServedPiece(vortex.PieceMetadata(1, 0, len(PIECE), digest(PIECE), "parent"), data=PIECE)


def _security(
    ca_dir: Path, out: Path, name: str, ips: tuple[str, ...] = ("127.0.0.1",), **limits: float
) -> SecurityConfig:
    """``security`` with a certificate ``name`` for ``ips`` from the CA in ``ca_dir`` (made there if missing)."""
    if not (ca_dir / CA_CERT).exists():
        init_ca(ca_dir)
    issued = issue(ca_dir, out, name, ips=list(ips), roles=("peer",))
    return SecurityConfig(
        tls=TlsConfig(ca=ca_dir / CA_CERT, cert=issued.cert, key=issued.key), limits=LimitsConfig(**limits)
    )


@pytest.fixture
def cluster_ca(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def parent_security(tmp_path: Path, cluster_ca: Path) -> SecurityConfig:
    return _security(cluster_ca, tmp_path, "parent")


@pytest.fixture
def child_security(tmp_path: Path, cluster_ca: Path) -> SecurityConfig:
    return _security(cluster_ca, tmp_path, "child")


@pytest.fixture
def foreign_security(tmp_path: Path, cluster_ca: Path) -> SecurityConfig:
    """A child that trusts the cluster's CA but holds a certificate from another CA."""
    other = _security(tmp_path / "other-ca", tmp_path, "intruder")
    return SecurityConfig(tls=TlsConfig(ca=cluster_ca / CA_CERT, cert=other.tls.cert, key=other.tls.key))


def _plugin(kind: str, security: SecurityConfig | None, tmp_path: Path) -> Transport:
    if kind == "tcp":
        t: Transport = TcpTransport()
    else:
        t = QuicTransport(QuicConfig(max_datagram_size=8192))
        t.state_dir = tmp_path / f"quic-{id(security)}"
    t.security = security
    return t


@contextlib.asynccontextmanager
async def _serve(transport: Transport) -> AsyncIterator[tuple[object, Calls, str]]:
    calls = Calls()
    server = await transport.serve("127.0.0.1", 0, calls)
    try:
        yield server, calls, transport.served_address(server, "127.0.0.1")
    finally:
        await server.close()


async def _fetch(transport: Transport, address: str) -> bytes:
    conn = await transport.connect(address, 5)
    try:
        sink = Collector(len(PIECE))
        meta = await conn.fetch(TASK_ID, 1, sink)
        await sink.commit(meta.digest)
        return sink.data
    finally:
        await conn.close()


# -- mutual TLS on TCP and QUIC -------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "quic"])
async def test_a_tls_fetch_returns_the_piece(kind, tmp_path, parent_security, child_security):
    async with _serve(_plugin(kind, parent_security, tmp_path)) as (_, calls, address):
        assert await _fetch(_plugin(kind, child_security, tmp_path), address) == PIECE
        assert calls.count == 1


async def test_tcp_without_a_client_certificate_is_refused(tmp_path, parent_security):
    """A TLS client that trusts the CA but shows no certificate: the connection ends, no request is served."""
    context = ssl.create_default_context(cafile=str(parent_security.tls.ca))

    def attempt(address: str) -> bytes:
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=10)
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(vortex.encode_download_piece(TASK_ID, 1))
            try:  # TLS 1.3: the refusal comes after the client's side of the handshake
                return tls.recv(1 << 16)
            except (ssl.SSLError, ConnectionError):  # an alert, or a reset: refused either way
                return b""

    async with _serve(_plugin("tcp", parent_security, tmp_path)) as (server, calls, address):
        assert await asyncio.to_thread(attempt, address) == b""
        await wait_for(lambda: server.connections == 0)
        assert calls.count == 0


async def test_tcp_plaintext_to_a_tls_server_gets_nothing(tmp_path, parent_security):
    """A plaintext Vortex request to the TLS piece server is not a ClientHello: refused, never served."""
    async with _serve(_plugin("tcp", parent_security, tmp_path)) as (_, calls, address):
        with pytest.raises(PeerError):
            await _fetch(_plugin("tcp", None, tmp_path), address)
        assert calls.count == 0


@pytest.mark.parametrize("kind", ["tcp", "quic"])
async def test_a_certificate_from_another_ca_is_refused(kind, tmp_path, parent_security, foreign_security):
    async with _serve(_plugin(kind, parent_security, tmp_path)) as (_, calls, address):
        with pytest.raises(PeerError):
            await _fetch(_plugin(kind, foreign_security, tmp_path), address)
        assert calls.count == 0


async def test_quic_without_a_client_certificate_is_refused(tmp_path, parent_security):
    """A QUIC child that presents no certificate: the parent closes the connection."""
    child = QuicTransport(QuicConfig(max_datagram_size=8192))
    child.state_dir = tmp_path / "bare-child"
    async with _serve(_plugin("quic", parent_security, tmp_path)) as (_, calls, address):
        with pytest.raises(PeerError, match="certificate refused"):
            await _fetch(child, address)
        assert calls.count == 0


@pytest.mark.parametrize("kind", ["tcp", "quic"])
async def test_a_server_certificate_not_naming_the_dialled_address_is_refused(
    kind, tmp_path, cluster_ca, child_security
):
    """The parent's certificate chains to the CA but names 10.1.2.3; the child dialled 127.0.0.1."""
    elsewhere = _security(cluster_ca, tmp_path, "elsewhere", ips=("10.1.2.3",))
    async with _serve(_plugin(kind, elsewhere, tmp_path)) as (_, calls, address):
        with pytest.raises(PeerError, match=r"10\.1\.2\.3|match"):
            await _fetch(_plugin(kind, child_security, tmp_path), address)
        assert calls.count == 0


async def test_quic_plaintext_child_with_its_own_certificate_is_refused(tmp_path, parent_security):
    """A child with a self-signed certificate (no cluster CA): refused by the parent."""
    child = QuicTransport(QuicConfig(max_datagram_size=8192, require_client_cert=True, ca=parent_security.tls.ca))
    child.state_dir = tmp_path / "self-signed-child"
    async with _serve(_plugin("quic", parent_security, tmp_path)) as (_, calls, address):
        with pytest.raises(PeerError):
            await _fetch(child, address)
        assert calls.count == 0


# -- WebRTC's signalling and RDMA's endpoint exchange ------------------------------------


async def test_webrtc_signalling_is_mutual_tls(tmp_path, parent_security, child_security):
    pytest.importorskip("aiortc")
    import aiohttp

    from damselfly.plugins.transport.webrtc import OFFER_PATH, WebrtcTransport

    parent, child = WebrtcTransport(), WebrtcTransport()
    parent.security, child.security = parent_security, child_security
    async with _serve(parent) as (_, calls, address):
        assert await _fetch(child, address) == PIECE  # a cluster member gets the piece
        # no client certificate: the offer endpoint refuses the TLS connection itself
        context = ssl.create_default_context(cafile=str(parent_security.tls.ca))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.post(f"https://{address}{OFFER_PATH}", json={}, ssl=context) as resp:
                    await resp.read()
            with pytest.raises(aiohttp.ClientError):  # nor does plaintext HTTP reach it
                async with http.post(f"http://{address}{OFFER_PATH}", json={}) as resp:
                    await resp.read()
        foreign = WebrtcTransport()  # a child from another CA neither
        foreign.security = SecurityConfig(tls=TlsConfig(ca=parent_security.tls.ca, **_other_ca_pair(tmp_path)))
        with pytest.raises(PeerError):
            await _fetch(foreign, address)
        assert calls.count == 1


def _other_ca_pair(tmp_path: Path) -> dict[str, Path]:
    other = _security(tmp_path / "webrtc-other-ca", tmp_path, "webrtc-intruder")
    return {"cert": other.tls.cert, "key": other.tls.key}


async def test_rdma_endpoint_exchange_is_mutual_tls(tmp_path, parent_security, child_security):
    from damselfly.testing.verbs import LoopbackRdmaTransport

    parent, child, bare = LoopbackRdmaTransport(), LoopbackRdmaTransport(), LoopbackRdmaTransport()
    parent.security, child.security = parent_security, child_security
    async with _serve(parent) as (_, calls, address):
        assert await _fetch(child, address) == PIECE
        with pytest.raises(PeerError, match="did not exchange endpoints"):
            await bare.connect(address, 5)  # plaintext gRPC: no queue pair
        assert calls.count == 1


# -- bounds -------------------------------------------------------------------------


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _raw_fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(vortex.encode_download_piece(TASK_ID, 1))
    await writer.drain()
    head = await reader.readexactly(6)
    _, tag, length = struct.unpack(">BBI", head)
    assert tag == vortex.Tag.PIECE_CONTENT
    return (await reader.readexactly(length))[-len(PIECE) :]


async def test_the_tcp_piece_server_closes_connections_past_the_cap(tmp_path):
    plugin = _plugin("tcp", SecurityConfig(limits=LimitsConfig(piece_connections=2)), tmp_path)
    async with _serve(plugin) as (server, _, address):
        held = [await _raw(address) for _ in range(2)]
        await wait_for(lambda: server.connections == 2)
        reader, writer = await _raw(address)
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed at once, nothing said
        writer.close()
        for r, w in held:  # the ones it holds still work
            assert await _raw_fetch(r, w) == PIECE
            w.close()
        await wait_for(lambda: server.connections == 0)
        r, w = await _raw(address)  # room again
        assert await _raw_fetch(r, w) == PIECE
        w.close()


async def test_the_tls_piece_server_refuses_past_the_cap_before_any_handshake(tmp_path, cluster_ca, child_security):
    parent = _security(cluster_ca, tmp_path, "capped", piece_connections=1)
    async with _serve(_plugin("tcp", parent, tmp_path)) as (server, _, address):
        first = await _plugin("tcp", child_security, tmp_path).connect(address, 5)
        await wait_for(lambda: server.connections == 1)
        reader, writer = await _raw(address)
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # no ServerHello: closed before TLS
        writer.close()
        sink = Collector(len(PIECE))
        await first.fetch(TASK_ID, 1, sink)
        assert sink.data == PIECE
        await first.close()


async def test_the_tcp_piece_server_closes_idle_connections(tmp_path):
    idle = 0.2
    plugin = _plugin("tcp", SecurityConfig(limits=LimitsConfig(piece_idle_timeout=idle)), tmp_path)
    async with _serve(plugin) as (server, _, address):
        reader, writer = await _raw(address)
        assert await _raw_fetch(reader, writer) == PIECE  # busy first: the clock starts after the answer
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        assert time.monotonic() - started >= idle * 0.9
        writer.close()
        await wait_for(lambda: server.connections == 0)


@pytest.mark.parametrize("tls", [False, True])
async def test_a_child_sees_its_idle_connection_closed_before_it_fetches(tls, tmp_path, cluster_ca):
    """The parent's idle timeout ends a pooled connection: the child marks it broken on its own (so the pool
    drops it) instead of failing the next fetch and blaming the parent."""
    parent = _security(cluster_ca, tmp_path, "idle-parent", piece_idle_timeout=0.3)
    child = _security(cluster_ca, tmp_path, "idle-child") if tls else None
    if not tls:
        parent = SecurityConfig(limits=parent.limits)
    async with _serve(_plugin("tcp", parent, tmp_path)) as (server, _, address):
        conn = await _plugin("tcp", child, tmp_path).connect(address, 5)
        try:
            await asyncio.sleep(0.05)  # TLS 1.3 session tickets wait unread in the socket: they break nothing
            assert not conn.broken
            sink = Collector(len(PIECE))
            await conn.fetch(TASK_ID, 1, sink)
            assert sink.data == PIECE
            assert not conn.broken
            await wait_for(lambda: server.connections == 0)
            await wait_for(lambda: conn.broken)
        finally:
            await conn.close()


async def test_a_tls_handshake_that_never_comes_is_closed_after_the_idle_timeout(tmp_path, cluster_ca):
    parent = _security(cluster_ca, tmp_path, "waiting", piece_idle_timeout=0.2)
    async with _serve(_plugin("tcp", parent, tmp_path)) as (server, _, address):
        reader, writer = await _raw(address)  # connects, never says hello
        await wait_for(lambda: server.connections == 1)
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        writer.close()
        await wait_for(lambda: server.connections == 0)


async def test_the_quic_piece_server_closes_connections_past_the_cap(tmp_path, cluster_ca, child_security):
    parent = _security(cluster_ca, tmp_path, "capped-quic", piece_connections=1)
    async with _serve(_plugin("quic", parent, tmp_path)) as (server, _, address):
        first = await _plugin("quic", child_security, tmp_path).connect(address, 5)
        # closed in the handshake, where QUIC carries no reason (RFC 9000 10.2.3): the parent counts it
        with pytest.raises(PeerError, match=r"handshake .* failed"):
            await _plugin("quic", child_security, tmp_path).connect(address, 5)
        assert server.refusals == 1 and server.connections == 1
        sink = Collector(len(PIECE))
        await first.fetch(TASK_ID, 1, sink)
        assert sink.data == PIECE
        await first.close()


@pytest.mark.parametrize("kind", ["tcp", "quic"])
async def test_a_parent_that_sends_more_error_frames_than_the_cap_is_dropped(kind, tmp_path):
    """Every answer an Error frame (NOT_FOUND): the child keeps the connection for 3, drops it at the 4th."""
    async with _serve(_plugin(kind, None, tmp_path)) as (_, calls, address):
        child = _plugin(kind, SecurityConfig(limits=LimitsConfig(vortex_error_frames=3)), tmp_path)
        conn = await child.connect(address, 5)
        try:
            for _ in range(3):
                with pytest.raises(NotFound):
                    await conn.fetch(TASK_ID, 404, Collector(0))
                assert not conn.broken
            with pytest.raises(PeerError, match="more than 3 Error frames"):
                await conn.fetch(TASK_ID, 404, Collector(0))
            assert conn.broken
            with pytest.raises(PeerError):
                await conn.fetch(TASK_ID, 1, Collector(len(PIECE)))
        finally:
            await conn.close()
        assert calls.count == 4


async def test_a_tcp_child_that_sends_an_error_frame_is_dropped(tmp_path):
    async with _serve(_plugin("tcp", None, tmp_path)) as (server, calls, address):
        reader, writer = await _raw(address)
        writer.write(vortex.encode_error(vortex.ErrorCode.INTERNAL, "boo"))
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)  # one Error frame back, then the end
        assert rest[1] == vortex.Tag.ERROR
        writer.close()
        await wait_for(lambda: server.connections == 0)
        assert calls.count == 0


async def test_a_quic_child_that_sends_more_error_frames_than_the_cap_is_dropped(tmp_path):
    parent = _plugin("quic", SecurityConfig(limits=LimitsConfig(vortex_error_frames=3)), tmp_path)
    async with _serve(parent) as (server, calls, address):
        conn = await _plugin("quic", None, tmp_path).connect(address, 5)
        protocol = conn._p  # the child's own QUIC connection, used to send what no honest child sends
        try:
            for _ in range(4):
                stream = protocol._quic.get_next_available_stream_id()
                protocol._quic.send_stream_data(stream, vortex.encode_error(vortex.ErrorCode.INTERNAL, "x"), True)
                protocol.transmit()
            await wait_for(lambda: conn.broken)
            assert "too many bad requests" in str(protocol.lost)
        finally:
            await conn.close()
        await wait_for(lambda: server.connections == 0)
        assert calls.count == 0


async def test_an_oversized_frame_header_is_refused_without_waiting_for_its_body(tmp_path):
    """A header claiming 4 GiB: the server answers with an Error frame and hangs up at once."""
    async with _serve(_plugin("tcp", None, tmp_path)) as (server, calls, address):
        for tag in (vortex.Tag.DOWNLOAD_PIECE, vortex.Tag.ERROR, vortex.Tag.PIECE_CONTENT, 77):
            reader, writer = await _raw(address)
            writer.write(struct.pack(">BBI", 0, tag, 0xFFFFFFFF))
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 5)
            assert rest[1] == vortex.Tag.ERROR
            writer.close()
        await wait_for(lambda: server.connections == 0)
        assert calls.count == 0


async def test_a_tls_handshake_must_finish_within_the_header_timeout_and_cannot_hold_the_server(
    tmp_path, cluster_ca, child_security
):
    """Connections that never say hello end after header_timeout however long the idle timeout,
    and one address holds at most HANDSHAKES_PER_ADDRESS unfinished handshakes (the next is closed
    at once), so one host cannot fill the server's connections with handshakes that never come."""
    from damselfly.plugins.transport.tcp import HANDSHAKES_PER_ADDRESS

    parent = _security(cluster_ca, tmp_path, "shaking", header_timeout=0.3, piece_idle_timeout=60)
    async with _serve(_plugin("tcp", parent, tmp_path)) as (server, _, address):
        reader, writer = await _raw(address)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        assert time.monotonic() - started < 30  # the handshake's own clock, not the idle timeout's
        writer.close()
        await wait_for(lambda: server.connections == 0)
    parent = _security(cluster_ca, tmp_path, "held", header_timeout=30)
    async with _serve(_plugin("tcp", parent, tmp_path)) as (server, _, address):
        held = [await _raw(address) for _ in range(HANDSHAKES_PER_ADDRESS)]
        await wait_for(lambda: server.connections == HANDSHAKES_PER_ADDRESS)
        reader, writer = await _raw(address)  # one more from the same address: closed at once
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        writer.close()
        for _, w in held:
            w.close()
        await wait_for(lambda: server.connections == 0)
        member = await _plugin("tcp", child_security, tmp_path).connect(address, 5)
        sink = Collector(len(PIECE))
        await member.fetch(TASK_ID, 1, sink)
        assert sink.data == PIECE
        await member.close()
