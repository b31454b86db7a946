"""``tcp``: Vortex frames over plain TCP, as Dragonfly serves them on port 4005.

The server sends a stored piece with ``sendfile`` when the storage has it in a
file, so piece bytes never pass through Python on the way out. The client reads
into one reused buffer and hands each chunk straight to the storage writer, so
a connection holds at most that buffer, whatever the piece length.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import FileRegion, PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, NotFound, PeerError, ProtocolError
from damselfly.hookspecs import hookimpl
from damselfly.plugins.transport.common import SEND_SLICE, ParentRefused, PieceResponse, answer, split_address


class TcpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    read_buffer: int = Field(1 << 20, ge=4096, description="Bytes read from the socket at a time (per connection).")
    socket_buffer: int = Field(0, ge=0, description="SO_RCVBUF/SO_SNDBUF to ask for (0: the kernel's default).")
    sendfile: bool = Field(True, description="Send stored pieces with sendfile(2) when they lie in a file.")


def _tune(sock: socket.socket | None, buffer: int = 0) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)


# -- server -----------------------------------------------------------------------


class _Server:
    def __init__(self, server: asyncio.Server, handlers: set[asyncio.Task[None]]):
        self._server = server
        self._handlers = handlers
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lookup: PieceLookup, use_sendfile: bool
) -> None:
    _tune(writer.get_extra_info("socket"))
    decoder = vortex.Decoder(max_frame=vortex.DOWNLOAD_PIECE_SIZE)
    loop = asyncio.get_running_loop()
    peer = writer.get_extra_info("peername")
    try:
        while True:
            data = await reader.read(65536)
            decoder.receive_data(data)
            while True:
                try:
                    event = decoder.next_event()
                except ProtocolError as exc:
                    writer.write(vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, str(exc)))
                    await writer.drain()
                    logger.debug("closing {}: {}", peer, exc)
                    return
                if event is vortex.NEED_DATA:
                    break
                if isinstance(event, vortex.Close):
                    return
                if not isinstance(event, vortex.DownloadPiece):
                    writer.write(
                        vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, f"unexpected {type(event).__name__}")
                    )
                    await writer.drain()
                    return
                await _send_piece(writer, loop, lookup, event, use_sendfile)
            if not data:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    except PeerError as exc:  # the piece broke off mid-frame: hang up so the child sees it
        logger.warning("dropping {}: {}", peer, exc)
        return
    finally:
        writer.close()


async def _send_piece(
    writer: asyncio.StreamWriter,
    loop: asyncio.AbstractEventLoop,
    lookup: PieceLookup,
    req: vortex.DownloadPiece,
    use_sendfile: bool,
) -> None:
    async def send_region(region: FileRegion) -> None:
        await writer.drain()  # the header is on the wire first; nothing else writes until the piece is out
        sock = writer.get_extra_info("socket")
        if sock is None:
            raise PeerError("the connection has no socket to sendfile on")
        fd = os.dup(sock.fileno())  # the thread's own descriptor: a close here cannot hand it another socket
        job = loop.run_in_executor(_SEND_THREADS, _sendfile_all, fd, region)
        job.add_done_callback(lambda _: os.close(fd))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if not job.done():  # (once done, the descriptor is closed, its number maybe reused)
                _shutdown(fd)  # the thread wakes at once and gives the descriptor back
            raise

    await answer(writer, lookup, req, SEND_SLICE, send_region if use_sendfile else None)


# A stored piece goes out from a worker thread: sendfile(2) and poll(2) on the
# connection's (non-blocking) descriptor, both without the GIL. The event loop's own
# sendfile needs a loop turn and two epoll_ctl calls each time the send buffer fills,
# many times per piece on a slow link.
_SEND_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="damselfly-tcp-send")
SEND_STALL_SECONDS = 60.0


def _shutdown(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _sendfile_all(fd: int, region: FileRegion) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    with open(region.path, "rb") as f:
        offset, left = region.offset, region.length
        while left:
            try:
                sent = os.sendfile(fd, f.fileno(), offset, left)
            except BlockingIOError:
                if not poller.poll(SEND_STALL_SECONDS * 1000):
                    raise PeerError(f"the child took nothing for {SEND_STALL_SECONDS:.0f} s") from None
                continue
            except OSError as exc:
                raise PeerError(f"sendfile failed: {exc}") from exc
            if sent == 0:
                raise PeerError(f"piece cut short on disk, {left} of {region.length} bytes unsent")
            offset += sent
            left -= sent


# -- client -----------------------------------------------------------------------
#
# A fetch runs in a worker thread on a blocking socket: recv_into, crc32 and the
# storage's pwrite all release the GIL, so pieces move on every core while the
# event loop stays free. A cancelled fetch shuts the socket down so its thread
# ends at once; the storage writer refuses writes after ``abort``.

_HEAD_READ = 4096
_FETCH_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="damselfly-tcp")


_buffers = threading.local()  # each fetch thread's read buffer, made once per thread and size


def _thread_buffer(size: int) -> memoryview:
    """This worker thread's read buffer: a fetch runs on one thread, so connections share them."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None or len(view) != size:
        view = _buffers.view = memoryview(bytearray(size))
    return view


class TcpConnection(PieceConnection):
    def __init__(self, sock: socket.socket, read_buffer: int):
        self._sock = sock
        self._read_buffer = read_buffer
        self._busy = False
        self._turn = asyncio.Lock()
        self._lost: Exception | None = None

    @property
    def broken(self) -> bool:
        return self._lost is not None

    def _fail(self, exc: Exception) -> Exception:
        if self._lost is None:
            self._lost = exc
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return exc

    def _fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        sock, view = self._sock, _thread_buffer(self._read_buffer)
        resp = PieceResponse(number)
        try:
            sock.sendall(vortex.encode_download_piece(task_id, number))
            while not resp.done:
                left = resp.piece_left
                # Inside a piece, wait for as much of it as the buffer holds: one
                # syscall, one pwrite and one crc32 per buffer, all without the GIL.
                if left:
                    n = sock.recv_into(view, min(left, len(view)), socket.MSG_WAITALL)
                else:  # a frame head: read little, so the decoder never buffers piece bytes
                    n = sock.recv_into(view, _HEAD_READ)
                for chunk in resp.feed(view[:n]):
                    sink.write(chunk)
                if n == 0:
                    raise PeerError("parent closed the connection")
            assert resp.metadata is not None
            return resp.metadata
        except (NotFound, ParentRefused):
            raise
        except DamselflyError as exc:
            raise self._fail(exc) from None
        except OSError as exc:
            raise self._fail(PeerError(f"connection to parent failed: {exc}")) from None

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        async with self._turn:  # requests on one connection take turns, as Vortex over TCP has no streams
            return await self._fetch_one(task_id, number, sink)

    async def _fetch_one(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        if self._lost is not None:
            raise PeerError(f"connection is broken: {self._lost}")
        self._busy = True
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_FETCH_THREADS, self._fetch, task_id, number, sink)
        except ParentRefused as exc:
            raise PeerError(str(exc)) from None
        except asyncio.CancelledError:
            self._fail(PeerError("fetch cancelled"))  # the thread sees a dead socket and ends
            raise
        finally:
            self._busy = False

    async def close(self) -> None:
        if self._lost is None and not self._busy:
            try:
                self._sock.sendall(vortex.encode_close())
            except OSError:
                pass
        self._fail(PeerError("closed"))
        self._sock.close()


class TcpTransport(Transport):
    name: ClassVar[str] = "tcp"
    connections_per_parent: ClassVar[int] = 16  # a request holds its connection until its piece is in
    Config = TcpConfig
    options: TcpConfig

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        handlers: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await _serve_connection(reader, writer, lookup, self.options.sendfile)
            except asyncio.CancelledError:
                writer.close()  # the server is closing: end quietly
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(handle, host, port, reuse_address=True)
        return _Server(server, handlers)

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        host, port = split_address(address)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(_FETCH_THREADS, socket.create_connection, (host, port), timeout)
        except OSError as exc:
            raise PeerError(f"cannot connect to {address} after {time.monotonic() - started:.1f}s: {exc}") from None
        sock.settimeout(None)
        _tune(sock, self.options.socket_buffer)
        return TcpConnection(sock, self.options.read_buffer)


@hookimpl
def damselfly_add_transports(registry):  # type: ignore[no-untyped-def]
    registry.add(TcpTransport)
