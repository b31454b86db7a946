"""The conformance kit run against the ``rdma`` plugin on the in-process loopback fabric.

No RDMA hardware exists here: ``damselfly.testing.verbs`` stands in for the verbs
(see its docstring for the semantics it keeps). What runs is everything above the
queue pair: the endpoint exchange over gRPC, the messenger and its flow control, the
parent and the child.
"""

import asyncio

import pytest

from damselfly.core.errors import PeerError
from damselfly.testing.transport import TASK_ID, Collector, TransportConformance, tls_security
from damselfly.testing.verbs import LoopbackQueuePair, LoopbackRdmaTransport


class TestRdma(TransportConformance):
    @pytest.fixture
    def transport(self):
        return LoopbackRdmaTransport()


class TestRdmaMutualTls(TransportConformance):
    """The endpoint exchange over gRPC with the cluster's mutual TLS."""

    @pytest.fixture
    def transport(self, tmp_path):
        t = LoopbackRdmaTransport()
        t.security = tls_security(tmp_path)
        return t


async def test_a_silent_parent_times_out():
    """A parent that never answers (dead, and the fabric told nobody): the child gives up."""
    never = asyncio.Event()

    async def lookup(task_id, number):
        await never.wait()

    transport = LoopbackRdmaTransport(LoopbackRdmaTransport.Config(idle_timeout=0.2))
    server = await transport.serve("127.0.0.1", 0, lookup)
    try:
        conn = await transport.connect(f"127.0.0.1:{server.port}", 5)
        with pytest.raises(PeerError, match="no bytes from the parent"):
            await asyncio.wait_for(conn.fetch(TASK_ID, 1, Collector(1)), 10)
        assert conn.broken is False  # nothing arrived out of step: the pool may try it again
        await conn.close()
    finally:
        await server.close()  # cancels the answer still waiting on the lookup


async def test_a_vanished_parent_fails_the_next_send():
    """The parent's queue pairs are gone (its process died): the child's SEND fails, and it says so."""

    async def lookup(task_id, number):
        raise AssertionError("not reached")

    transport = LoopbackRdmaTransport()
    server = await transport.serve("127.0.0.1", 0, lookup)
    conn = await transport.connect(f"127.0.0.1:{server.port}", 5)
    parents = [qp for qp in LoopbackQueuePair.fabric.values() if qp.remote == conn.qp.num]
    assert len(parents) == 1
    parents[0].close()
    with pytest.raises(PeerError, match="retry counter exceeded"):
        await asyncio.wait_for(conn.fetch(TASK_ID, 1, Collector(1)), 10)
    assert conn.broken
    await conn.close()
    await server.close()


async def test_a_slow_child_holds_back_the_parent_by_its_receive_buffers():
    """The parent never has more SENDs out than the child has receive buffers posted."""
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    from damselfly.contracts import ServedPiece
    from damselfly.core import vortex
    from damselfly.core.piece import digest

    async def lookup(task_id, number):
        return ServedPiece(vortex.PieceMetadata(number, 0, len(data), digest(data)), data=data)

    options = LoopbackRdmaTransport.Config(message_size=64 * 1024, recv_depth=4, send_depth=4)
    transport = LoopbackRdmaTransport(options)
    server = await transport.serve("127.0.0.1", 0, lookup)
    conn = await transport.connect(f"127.0.0.1:{server.port}", 5)
    parent = next(qp for qp in LoopbackQueuePair.fabric.values() if qp.remote == conn.qp.num)
    most_waiting = 0

    class Slow(Collector):
        def write(self, chunk):
            nonlocal most_waiting
            most_waiting = max(most_waiting, len(parent.outbox))
            super().write(chunk)

    try:
        sink = Slow(len(data), delay=0.002)
        meta = await conn.fetch(TASK_ID, 1, sink)
        await sink.commit(meta.digest)
        assert sink.data == data
        assert len(conn.qp.recv_posted) + len(conn.m.held) == options.recv_depth
        assert 0 < most_waiting <= options.send_depth  # the parent waited on the child's buffers
    finally:
        await conn.close()
        await server.close()
