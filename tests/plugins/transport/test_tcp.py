"""The tcp transport: real sockets on 127.0.0.1, a real storage behind the server."""

import asyncio

import pytest

from damselfly.contracts import ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import NotFound, PeerError, PieceCorrupt, ProtocolError
from damselfly.core.piece import Layout, PieceSpan, digest
from damselfly.core.task import Task
from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryStorage
from damselfly.plugins.transport.tcp import TcpConfig, TcpTransport

MiB = 1 << 20
TASK = "ef" * 32
CONTENT = bytes((i * 7) % 256 for i in range(9 * MiB + 123))


@pytest.fixture(params=["sendfile", "copy"])
async def parent(request, tmp_path):
    """A storage holding the whole task and a tcp piece server in front of it."""
    store = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await store.open()
    task = await store.create(Task(id=TASK, content_length=len(CONTENT), piece_length=4 * MiB))
    for span in task.layout.spans():
        w = store.writer(TASK, span)
        w.write(CONTENT[span.offset : span.end])
        await w.commit(None)

    async def lookup(task_id, number):
        if number == 99:
            raise RuntimeError("disk on fire")
        rec = store.get(task_id).pieces.get(number) if store.get(task_id) else None
        if rec is None:
            raise NotFound(f"piece {number} not here")
        meta = vortex.PieceMetadata(rec.number, rec.offset, rec.length, rec.digest, "parent")
        region = store.piece_region(task_id, number)
        return ServedPiece(meta, region=region)

    transport = TcpTransport(TcpConfig(sendfile=request.param == "sendfile"))
    server = await transport.serve("127.0.0.1", 0, lookup)
    yield transport, f"127.0.0.1:{server.port}"
    await server.close()
    await store.close()


@pytest.fixture
async def child(tmp_path):
    store = MemoryStorage(tmp_path)
    await store.create(Task(id=TASK, content_length=len(CONTENT), piece_length=4 * MiB))
    return store


async def test_fetch_every_piece(parent, child):
    transport, address = parent
    conn = await transport.connect(address, 3)
    layout = Layout(len(CONTENT), 4 * MiB)
    for span in layout.spans():
        w = child.writer(TASK, span)
        meta = await conn.fetch(TASK, span.number, w)
        await w.commit(meta.digest)
        assert meta.offset == span.offset and meta.length == span.length and meta.parent_id == "parent"
    await conn.close()
    assert await child.read_piece(TASK, 2) == CONTENT[8 * MiB :]


async def test_many_connections_at_once(parent, child):
    transport, address = parent
    layout = Layout(len(CONTENT), 4 * MiB)

    async def one(span: PieceSpan):
        conn = await transport.connect(address, 3)
        w = child.writer(TASK, span)
        meta = await conn.fetch(TASK, span.number, w)
        await w.commit(meta.digest)
        await conn.close()

    await asyncio.gather(*(one(s) for s in layout.spans() * 3))
    assert len(child.get(TASK).pieces) == 3


async def test_not_found_and_internal_errors_keep_the_connection(parent, child):
    transport, address = parent
    conn = await transport.connect(address, 3)
    span = Layout(len(CONTENT), 4 * MiB).span(0)
    with pytest.raises(NotFound, match="not here"):
        await conn.fetch(TASK, 7, child.writer(TASK, span))
    with pytest.raises(PeerError, match="disk on fire"):
        await conn.fetch(TASK, 99, child.writer(TASK, span))
    w = child.writer(TASK, span)
    meta = await conn.fetch(TASK, 0, w)  # still usable
    await w.commit(meta.digest)
    assert not conn.broken
    await conn.close()


async def test_connect_refused_is_a_peer_error():
    with pytest.raises(PeerError, match="cannot connect"):
        await TcpTransport().connect("127.0.0.1:9", 2)


class RawServer:
    """A misbehaving parent: answers a request with ``reply()``, then hangs up or waits for the child to."""

    def __init__(self, reply):
        self.reply = reply
        self.handled = asyncio.Event()

    async def handle(self, reader, writer):
        try:
            await reader.readexactly(vortex.HEADER_SIZE + vortex.DOWNLOAD_PIECE_SIZE)
            data, close = self.reply()
            writer.write(data)
            await writer.drain()
            if not close:
                await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()
            await writer.wait_closed()
            self.handled.set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc):
        await asyncio.wait_for(self.handled.wait(), 5)
        self.server.close()
        await self.server.wait_closed()


def _frame(data: bytes, number: int = 0, claimed_digest: str | None = None) -> bytes:
    meta = vortex.PieceMetadata(number, 0, len(data), claimed_digest or digest(data), "liar")
    return vortex.encode_piece_content(meta, data)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (lambda: (_frame(b"x" * 1000)[:500], True), PeerError),  # vanishes mid-piece
        (lambda: (_frame(b"x" * 1000, number=5), False), ProtocolError),  # answers another piece
        (lambda: (b"\x00\x09\x00\x00\x00\x00", False), ProtocolError),  # unknown tag
    ],
)
async def test_misbehaving_parents(child, reply, error):
    async with RawServer(reply) as address:
        conn = await TcpTransport().connect(address, 3)
        with pytest.raises(error):
            await asyncio.wait_for(conn.fetch(TASK, 0, child.writer(TASK, PieceSpan(0, 0, 1000))), 5)
        assert conn.broken
        await conn.close()


async def test_a_parent_that_lies_about_the_digest_is_caught_at_commit(child):
    good = b"y" * 1000
    async with RawServer(lambda: (_frame(b"z" * 1000, claimed_digest=digest(good)), False)) as address:
        conn = await TcpTransport().connect(address, 3)
        w = child.writer(TASK, PieceSpan(0, 0, 1000))
        meta = await conn.fetch(TASK, 0, w)
        with pytest.raises(PieceCorrupt):
            await w.commit(meta.digest)
        assert 0 not in child.get(TASK).pieces
        await conn.close()
