"""The child's connection pool: per-parent caps, sharing, fallback between transports."""

import asyncio
from typing import ClassVar

import pytest

from damselfly.contracts import PieceConnection, Transport
from damselfly.core.errors import PeerError
from damselfly.daemon.download import ConnectionPool


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
