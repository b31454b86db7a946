"""The child's connection pool: per-parent caps, sharing, fallback between transports."""

import asyncio
from typing import ClassVar

import pytest

from damselfly.contracts import PieceConnection, Transport
from damselfly.core.errors import PeerError
from damselfly.daemon.pool import ConnectionPool


class _Conn(PieceConnection):
    def __init__(self):
        self.closed = False

    async def fetch(self, task_id, number, sink):
        raise NotImplementedError

    async def close(self):
        self.closed = True

    @property
    def broken(self):
        return self.closed


class _Counting(Transport):
    """Connects after ``gate`` opens (or refuses when ``refuse``); counts attempts."""

    name: ClassVar[str] = "slowpoke"
    connections_per_parent: ClassVar[int] = 2

    def __init__(self, refuse: bool = False):
        super().__init__()
        self.refuse = refuse
        self.attempts = 0
        self.gate = asyncio.Event()
        self.two_connecting = asyncio.Event()

    async def serve(self, host, port, lookup):
        raise NotImplementedError

    async def connect(self, address, timeout):
        self.attempts += 1
        if self.attempts == 2:
            self.two_connecting.set()
        await self.gate.wait()
        if self.refuse:
            raise PeerError("handshake refused")
        return _Conn()


class _Plain(_Counting):
    name: ClassVar[str] = "plain"


@pytest.mark.timeout(10)
async def test_concurrent_fetches_open_no_more_than_the_cap_and_share():
    t = _Counting()
    pool = ConnectionPool([t], 5)
    waiting = [asyncio.ensure_future(pool.acquire({"slowpoke": "p:1"})) for _ in range(8)]
    await t.two_connecting.wait()  # the cap is reached: the other six acquires must wait for these
    t.gate.set()
    got = await asyncio.gather(*waiting)
    assert t.attempts == 2
    conns = {id(c) for _, c in got}
    assert len(conns) == 2
    # released ones are reused before anything new is opened
    for key, conn in got:
        await pool.release(key, conn)
    key, conn = await pool.acquire({"slowpoke": "p:1"})
    assert t.attempts == 2 and id(conn) in conns
    # a broken connection is closed on release and replaced
    conn.closed = True
    await pool.release(key, conn)
    for _ in range(2):
        await pool.acquire({"slowpoke": "p:1"})
    assert t.attempts == 3
    await pool.close()


@pytest.mark.timeout(10)
async def test_a_refusing_transport_falls_back_and_is_not_retried_at_once():
    bad, good = _Counting(refuse=True), _Plain()
    bad.gate.set()
    good.gate.set()
    pool = ConnectionPool([bad, good], 5, retry_after=60)
    key, _ = await pool.acquire({"slowpoke": "p:1", "plain": "p:2"})
    assert key == "plain|p:2" and bad.attempts == 1
    await pool.acquire({"slowpoke": "p:1", "plain": "p:2"})
    assert bad.attempts == 1  # remembered for a minute
    with pytest.raises(PeerError, match="handshake refused"):
        await pool.acquire({"slowpoke": "p:1"})
    with pytest.raises(PeerError, match="no common transport"):
        await pool.acquire({"quic": "p:3"})
    await pool.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tls", [False, True])
async def test_tcp_opens_fewer_connections_to_a_parent_under_tls(tls, tmp_path):
    """16 fetches at once from one real piece server: 16 connections in plaintext, ``tls_connections`` (4)
    under mutual TLS, where more decrypting threads contend for the GIL more than they add."""
    from damselfly.contracts import ServedPiece
    from damselfly.core import vortex
    from damselfly.core.piece import digest
    from damselfly.plugins.transport.tcp import TcpTransport
    from damselfly.testing.transport import TASK_ID, Collector, tls_security

    data = b"p" * 4096
    gate, all_asked = asyncio.Event(), asyncio.Event()
    asked = 0

    async def lookup(task_id, number):
        nonlocal asked
        asked += 1
        if asked == expected:  # every connection the pool may open has a request waiting here
            all_asked.set()
        await gate.wait()
        return ServedPiece(vortex.PieceMetadata(number, 0, len(data), digest(data)), data=data)

    transport = TcpTransport()
    transport.security = tls_security(tmp_path) if tls else None
    expected = 4 if tls else 16
    assert transport.connections_per_parent == expected
    server = await transport.serve("127.0.0.1", 0, lookup)
    pool = ConnectionPool([transport], 5)
    address = {"tcp": f"127.0.0.1:{server.port}"}

    async def fetch(number):
        key, conn = await pool.acquire(address)
        try:
            sink = Collector(len(data))
            await conn.fetch(TASK_ID, number, sink)
            return sink.data
        finally:
            await pool.release(key, conn)

    try:
        fetches = [asyncio.ensure_future(fetch(n)) for n in range(16)]
        await all_asked.wait()
        assert server.connections == expected and asked == expected
        gate.set()
        assert await asyncio.gather(*fetches) == [data] * 16
        assert server.connections == expected
    finally:
        await pool.close()
        await server.close()
