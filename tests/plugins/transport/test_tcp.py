"""The tcp transport: real sockets on 127.0.0.1, a real storage behind the server."""

import asyncio
import socket

import pytest
from loguru import logger

from damselfly.contracts import ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import NotFound, PeerError, PieceCorrupt, ProtocolError
from damselfly.core.piece import Layout, PieceSpan, digest
from damselfly.core.task import Task
from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryStorage
from damselfly.plugins.transport import tcp
from damselfly.plugins.transport.tcp import TcpConfig, TcpTransport

MiB = 1 << 20
TASK = "ef" * 32
CONTENT = bytes((i * 7) % 256 for i in range(9 * MiB + 123))


def _served(store, rec) -> ServedPiece:
    """A stored piece as the parent serves it: its metadata and the file region it lies in."""
    meta = vortex.PieceMetadata(rec.number, rec.offset, rec.length, rec.digest, "parent")
    return ServedPiece(meta, region=store.piece_region(TASK, rec.number))


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
        return _served(store, rec)

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


# -- a child that stops reading mid-piece ------------------------------------------------

BIG = 32 * MiB  # far more than the two ends' socket buffers hold, so the send must wait on the child


@pytest.fixture
async def big_parent(tmp_path):
    """A sendfile parent holding one 32 MiB piece, and the log lines it writes."""
    store = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await store.open()
    await store.create(Task(id=TASK, content_length=BIG, piece_length=BIG))
    w = store.writer(TASK, PieceSpan(0, 0, BIG))
    w.write(bytes(BIG))
    await w.commit(None)

    async def lookup(task_id, number):
        return _served(store, store.get(task_id).pieces[number])

    loop = asyncio.get_running_loop()
    dropped = asyncio.Event()
    logger.enable("damselfly")  # the package keeps quiet unless asked (damselfly/__init__.py)
    sink = logger.add(
        lambda m: loop.call_soon_threadsafe(dropped.set) if "took nothing" in m else None, level="WARNING"
    )
    server = await TcpTransport(TcpConfig(sendfile=True)).serve("127.0.0.1", 0, lookup)
    yield server, dropped
    logger.remove(sink)
    logger.disable("damselfly")
    await server.close()
    await store.close()


async def _stalled_child(port: int):
    """A raw child with a tiny receive buffer that asks for the piece and reads its first 64 KiB."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, vortex.encode_download_piece(TASK, 0))
    got = 0
    while got < 64 * 1024:
        chunk = await loop.sock_recv(sock, 65536)
        assert chunk, "the parent hung up before sending"
        got += len(chunk)
    return sock, got


async def _read_to_end(sock) -> int:
    loop = asyncio.get_running_loop()
    got = 0
    try:
        while chunk := await loop.sock_recv(sock, 1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    return got


async def test_a_child_that_takes_nothing_is_dropped(big_parent, monkeypatch):
    monkeypatch.setattr(tcp, "SEND_STALL_SECONDS", 0.3)
    server, dropped = big_parent
    sock, got = await _stalled_child(server.port)
    try:
        await asyncio.wait_for(dropped.wait(), 10)  # the parent gave up on the child, it did not wait 60 s
        got += await asyncio.wait_for(_read_to_end(sock), 10)  # then hung up: the child sees the end
    finally:
        sock.close()
    assert 64 * 1024 <= got < BIG  # the piece was cut off, never completed


async def test_closing_the_server_ends_a_send_that_waits_on_a_child(big_parent):
    server, dropped = big_parent
    sock, got = await _stalled_child(server.port)
    try:
        # the send thread waits in poll(2) for up to 60 s; closing shuts the socket down, so it ends now
        await asyncio.wait_for(server.close(), 5)
        got += await asyncio.wait_for(_read_to_end(sock), 5)
    finally:
        sock.close()
    assert got < BIG and not dropped.is_set()
