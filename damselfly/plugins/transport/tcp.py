"""``tcp``: Vortex frames over plain TCP, as Dragonfly serves them on port 4005.

The server sends a stored piece with ``sendfile`` when the storage has it in a
file, so piece bytes never pass through Python on the way out. The client reads
into one reused buffer and hands each chunk straight to the storage writer, so
a connection holds at most that buffer, whatever the piece length.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PeerError, ProtocolError
from damselfly.hookspecs import hookimpl


class TcpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    read_buffer: int = Field(1 << 20, ge=4096, description="Bytes read from the socket at a time.")
    sendfile: bool = Field(True, description="Send stored pieces with sendfile(2) when they lie in a file.")


def _tune(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    finally:
        writer.close()


async def _send_piece(
    writer: asyncio.StreamWriter,
    loop: asyncio.AbstractEventLoop,
    lookup: PieceLookup,
    req: vortex.DownloadPiece,
    use_sendfile: bool,
) -> None:
    try:
        served = await lookup(req.task_id, req.number)
    except NotFound as exc:
        writer.write(vortex.encode_error(vortex.ErrorCode.NOT_FOUND, str(exc), req.packet_id))
        await writer.drain()
        return
    except InvalidArgument as exc:
        writer.write(vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, str(exc), req.packet_id))
        await writer.drain()
        return
    except Exception as exc:  # any failure of ours becomes an Internal error frame
        logger.warning("serving piece {} of {} failed: {}", req.number, req.task_id[:12], exc)
        writer.write(vortex.encode_error(vortex.ErrorCode.INTERNAL, str(exc) or type(exc).__name__, req.packet_id))
        await writer.drain()
        return
    writer.write(vortex.encode_piece_header(served.metadata, req.packet_id))
    if served.region is not None and use_sendfile:
        with open(served.region.path, "rb") as f:
            sent = await loop.sendfile(writer.transport, f, served.region.offset, served.region.length)
        if sent != served.region.length:
            raise ConnectionError(f"sendfile sent {sent} of {served.region.length} bytes")
    else:
        data = served.data
        if data is None and served.region is not None:
            with open(served.region.path, "rb") as f:
                f.seek(served.region.offset)
                data = f.read(served.region.length)
        writer.write(data or b"")
        await writer.drain()


# -- client -----------------------------------------------------------------------


class _ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self, read_buffer: int):
        self._buf = bytearray(read_buffer)
        self._view = memoryview(self._buf)
        self.decoder = vortex.Decoder()
        self.transport: asyncio.Transport | None = None
        self.sink: PieceWriter | None = None
        self.waiter: asyncio.Future[vortex.PieceMetadata] | None = None
        self.meta: vortex.PieceMetadata | None = None
        self.expect_number = -1
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _tune(transport.get_extra_info("socket"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.decoder.receive_data(self._view[:nbytes])
            self._drain()
        except DamselflyError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        try:
            self.decoder.receive_data(b"")
            self._drain()
        except ProtocolError as exc:  # cut off mid-frame: the parent vanished
            self._fail(PeerError(f"parent hung up: {exc}"))
        except DamselflyError as exc:
            self._fail(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(PeerError(f"parent closed the connection{': ' + str(exc) if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _drain(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is vortex.NEED_DATA:
                return
            if self.waiter is None or self.waiter.done():
                raise ProtocolError(f"unsolicited {type(event).__name__} from parent")
            if isinstance(event, vortex.PieceData):
                assert self.sink is not None
                self.sink.write(event.data)
            elif isinstance(event, vortex.PieceContentStart):
                if event.metadata.number != self.expect_number:
                    raise ProtocolError(
                        f"lying parent: asked for piece {self.expect_number}, got {event.metadata.number}"
                    )
                self.meta = event.metadata
            elif isinstance(event, vortex.PieceContentEnd):
                assert self.meta is not None
                self.waiter.set_result(self.meta)
            elif isinstance(event, vortex.Error):
                if event.code == vortex.ErrorCode.NOT_FOUND:
                    self.waiter.set_exception(NotFound(f"parent: {event.message}"))
                else:
                    self.waiter.set_exception(PeerError(f"parent error {event.code}: {event.message}"))
            elif isinstance(event, vortex.Close):
                raise PeerError("parent closed the Vortex session")
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} from parent")


class TcpConnection(PieceConnection):
    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol):
        self._transport = transport
        self._protocol = protocol

    @property
    def broken(self) -> bool:
        return self._protocol.lost is not None or self._transport.is_closing()

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        p = self._protocol
        if p.lost is not None:
            raise PeerError(f"connection is broken: {p.lost}")
        if p.waiter is not None and not p.waiter.done():
            raise RuntimeError("one fetch at a time per connection")
        p.waiter = asyncio.get_running_loop().create_future()
        p.sink, p.meta, p.expect_number = sink, None, number
        self._transport.write(vortex.encode_download_piece(task_id, number))
        try:
            return await p.waiter
        except asyncio.CancelledError:
            # A cancelled fetch leaves the stream mid-frame: this connection is done.
            p._fail(PeerError("fetch cancelled"))
            raise
        finally:
            p.sink = None

    async def close(self) -> None:
        if not self._transport.is_closing():
            if self._protocol.lost is None:
                self._transport.write(vortex.encode_close())
            self._transport.close()


class TcpTransport(Transport):
    name: ClassVar[str] = "tcp"
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
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"bad piece address {address!r}, expected host:port")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientProtocol(self.options.read_buffer), host.strip("[]"), int(port)),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"cannot connect to {address} after {time.monotonic() - started:.1f}s: {exc}") from None
        assert isinstance(transport, asyncio.Transport)
        return TcpConnection(transport, protocol)


@hookimpl
def damselfly_add_transports(registry):  # type: ignore[no-untyped-def]
    registry.add(TcpTransport)
