"""The transport kit's stream shell: the whole Transport contract over any asyncio byte stream.

``StreamTransport`` is a thin I/O shell around the exchange (``kit.transport``): a
subclass says how to start a stream server and how to open one stream connection
(``asyncio.start_unix_server``/``open_unix_connection``, or ``start_server``/
``open_connection`` with ``sock=`` for a vsock or any other socket family), and the
base serves pieces from the daemon's lookup and fetches them, bounded as the built-in
transports are by ``security.limits``:

- a server holds at most ``piece_connections`` connections (past it, a new one is
  closed at once) and closes one that sends no request for ``piece_idle_timeout``
  seconds; a child that sends anything but requests gets an INVALID_ARGUMENT Error
  frame and is hung up on;
- a child's connection takes one request at a time, counts its parent's Error frames
  (past ``vortex_error_frames`` it is dropped), hands piece bytes to the storage writer
  a ``batch`` at a time in a worker thread (the writer checks the crc32 at ``commit``),
  holds at most that batch and the stream's buffer whatever the piece length, and says
  it is ``broken`` once the parent has closed it while idle;
- ``connect`` gives up after its timeout with a PeerError, as a refused connection does.

The stream base speaks plaintext: mutual TLS belongs to transports that cross hosts
(tcp, quic), and a unix socket is guarded by its directory's permissions. The parts
are public for transports that keep their own fast paths (tcp keeps sendfile and
its threaded reads, and uses ``StreamServer``, ``StreamChannel`` and
``serve_requests``).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from loguru import logger

from damselfly.config import LimitsConfig
from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PeerError, ProtocolError
from damselfly.kit.transport import ParentRefused, PieceResponse, RequestReader, answer, limits_of, write_all

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Respond = Callable[[vortex.DownloadPiece], Awaitable[None]]

UNIX_PREFIX = "unix:"  # a piece address that is a socket path: ``unix:/path/to/vortex.sock``
READ_SIZE = 65536  # bytes a server reads at a time: requests are 74 bytes each
HEAD_READ = 4096  # bytes a child reads for a frame head, so the decoder never buffers piece bytes


def unix_path(address: str) -> str:
    """The socket path of a ``unix:/path`` piece address, or a one-line InvalidArgument."""
    if not address.startswith(UNIX_PREFIX) or len(address) == len(UNIX_PREFIX):
        raise InvalidArgument(f"bad piece address {address!r}, expected unix:/path")
    return address[len(UNIX_PREFIX) :]


# -- the parent's side ---------------------------------------------------------------


class RequestChannel(Protocol):
    """A connection's byte stream as ``serve_requests`` uses it."""

    idle_timeout: float

    async def read(self) -> bytes:
        """Bytes from the child (b"" at the end of the stream); TimeoutError after ``idle_timeout``."""
        ...

    def write(self, data: bytes | memoryview) -> None: ...

    async def drain(self) -> None: ...


class StreamChannel:
    """A plaintext asyncio stream as a ``RequestChannel``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float):
        self.reader, self.writer, self.idle_timeout = reader, writer, idle_timeout

    async def read(self) -> bytes:
        async with asyncio.timeout(self.idle_timeout):
            return await self.reader.read(READ_SIZE)

    def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()


async def serve_requests(channel: RequestChannel, peer: object, respond: Respond) -> None:
    """Answer one connection's requests in turn until it closes, breaks the protocol or stays idle.

    ``respond`` answers one request (``answer`` on the channel, or a transport's own
    sendfile). A piece that breaks off mid-frame (PeerError) hangs up, so the child sees it.
    """
    requests = RequestReader()
    try:
        while True:
            try:
                data = await channel.read()
            except TimeoutError:
                logger.debug("closing {}: no request for {} s", peer, channel.idle_timeout)
                return
            requests.receive_data(data)
            while True:
                try:
                    req = requests.next_request()
                except ProtocolError as exc:
                    channel.write(vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, str(exc)))
                    await channel.drain()
                    logger.debug("closing {}: {}", peer, exc)
                    return
                if req is None:
                    break
                if isinstance(req, vortex.Close):
                    return
                await respond(req)
            if not data:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    except PeerError as exc:  # the piece broke off mid-frame: hang up so the child sees it
        logger.warning("dropping {}: {}", peer, exc)
        return


class Refusals:
    """Logs refused connections at most once a minute, with how many were refused since."""

    def __init__(self) -> None:
        self.count = 0
        self.logged = 0.0

    def note(self, peer: object, cap: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= 60:
            logger.warning(
                "piece server holds {} connections (security.limits.piece_connections): closed {} new ones, "
                "the latest from {}",
                cap,
                self.count,
                peer,
            )
            self.logged, self.count = now, 0


class StreamServer:
    """A listening piece server over a byte stream: the connections it holds, bounded, and its close.

    ``admit`` refuses a connection past ``limits.piece_connections`` at once (before any
    handshake, no buffers); ``hold`` runs an admitted connection's work, counted in
    ``connections`` until it ends, and closes it; ``close`` stops listening, cancels
    every connection, waits for them, and removes a unix socket's file.
    """

    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.refusals = Refusals()
        self.port = 0
        self.sockname: Any = None  # the listening socket's name: (host, port), or a unix socket's path
        self._listener: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def listening(self, listener: asyncio.Server) -> StreamServer:
        self._listener = listener
        self.sockname = listener.sockets[0].getsockname()
        if isinstance(self.sockname, tuple):
            self.port = self.sockname[1]
        return self

    @property
    def connections(self) -> int:
        """Connections open now (handshaking, idle or sending)."""
        return len(self._handlers)

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self._handlers) < self.limits.piece_connections:
            return True
        self.refuse(writer, self.limits.piece_connections)
        return False

    def refuse(self, writer: asyncio.StreamWriter, cap: int) -> None:
        self.refusals.note(writer.get_extra_info("peername"), cap)
        writer.transport.abort()  # at once: no handshake, no buffers

    async def hold(self, writer: asyncio.StreamWriter, work: Awaitable[None]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await work
        except asyncio.CancelledError:
            pass  # the server is closing: end quietly
        finally:
            writer.close()
            self._handlers.discard(task)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
        if isinstance(self.sockname, str) and self.sockname:
            Path(self.sockname).unlink(missing_ok=True)


# -- the child's side ----------------------------------------------------------------


class StreamConnection(PieceConnection):
    """A child's connection to one parent over a byte stream: requests take turns, as Vortex over
    TCP has no streams; a fetch that fails for any reason but an Error frame breaks the connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_errors: int = vortex.DEFAULT_MAX_ERRORS,
        batch: int = 1 << 20,
    ):
        self._reader, self._writer, self._batch = reader, writer, batch
        # one decoder for the connection's life: it counts the parent's Error frames across requests
        self._decoder = vortex.Decoder(max_errors=max_errors)
        self._turn = asyncio.Lock()
        self._lost: Exception | None = None

    @property
    def broken(self) -> bool:
        if self._lost is None and not self._turn.locked() and (self._reader.at_eof() or self._writer.is_closing()):
            self._lost = PeerError("the parent closed the idle connection")
        return self._lost is not None

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        async with self._turn:
            if self._lost is not None:
                raise PeerError(f"connection is broken: {self._lost}")
            try:
                return await self._fetch(task_id, number, sink)
            except NotFound:
                raise  # an Error frame: this request failed, the connection lives on
            except ParentRefused as exc:
                raise PeerError(str(exc)) from None
            except (DamselflyError, OSError, asyncio.CancelledError) as exc:
                self._lost = exc if isinstance(exc, DamselflyError) else PeerError(str(exc) or "fetch cancelled")
                self._writer.close()
                if isinstance(exc, OSError):
                    raise PeerError(f"connection to parent failed: {exc}") from None
                raise

    async def _fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        self._writer.write(vortex.encode_download_piece(task_id, number))
        await self._writer.drain()
        resp = PieceResponse(number, decoder=self._decoder)
        pending: list[memoryview] = []
        size = 0
        while not resp.done:
            parts = resp.feed(await self._reader.read(min(resp.piece_left or HEAD_READ, self._batch)))
            pending += parts
            size += sum(len(p) for p in parts)
            if pending and (size >= self._batch or resp.done):
                await asyncio.to_thread(write_all, sink, pending)  # a worker thread: the storage may block
                pending, size = [], 0
        assert resp.metadata is not None
        return resp.metadata

    async def close(self) -> None:
        if self._lost is None and not self._turn.locked():
            self._writer.write(vortex.encode_close())
        self._lost = self._lost or PeerError("closed")
        self._writer.close()


class StreamTransport(Transport, abc.ABC):
    """A transport over asyncio byte streams; a subclass writes ``start_server`` and ``open_connection``.

    ``served_address`` is ``ip:port`` for a server on an IP socket and ``unix:PATH`` for
    one on a unix socket (``unix_path`` reads it back); a subclass whose addresses take
    another form overrides it, as any transport may.
    """

    connections_per_parent: ClassVar[int] = 4
    batch: ClassVar[int] = 1 << 20  # piece bytes a child hands to the storage at a time

    @abc.abstractmethod
    async def start_server(self, handle: StreamHandler, host: str, port: int) -> asyncio.Server:
        """Listen, with ``handle`` for each connection (e.g. ``asyncio.start_unix_server(handle, path)``)."""

    @abc.abstractmethod
    async def open_connection(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """One connection to the piece server at ``address`` (e.g. ``asyncio.open_unix_connection(path)``);
        InvalidArgument for an address of another form. ``connect`` bounds it with its timeout."""

    def served_address(self, server: PieceServer, advertised_ip: str) -> str:
        if isinstance(server, StreamServer) and isinstance(server.sockname, str):
            return UNIX_PREFIX + server.sockname
        return super().served_address(server, advertised_ip)

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        server = StreamServer(limits_of(self.security))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if server.admit(writer):
                channel = StreamChannel(reader, writer, server.limits.piece_idle_timeout)
                peer = writer.get_extra_info("peername") or "a child"
                await server.hold(writer, serve_requests(channel, peer, lambda req: answer(writer, lookup, req)))

        return server.listening(await self.start_server(handle, host, port))

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        try:
            reader, writer = await asyncio.wait_for(self.open_connection(address), timeout)
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"cannot connect to {address}: {exc or 'timeout'}") from None
        return StreamConnection(reader, writer, limits_of(self.security).vortex_error_frames, self.batch)
