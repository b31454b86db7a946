"""``tcp``: Vortex frames over TCP, as Dragonfly serves them on port 4005, with mutual TLS when configured.

The server sends a stored piece with ``sendfile`` when the storage has it in a
file, so piece bytes never pass through Python on the way out. The client reads
into one reused buffer and hands each chunk straight to the storage writer, so
a connection holds at most that buffer, whatever the piece length.

With ``security.tls`` (ca, cert, key) both sides speak TLS (1.2 at least; 1.3 in
practice): the server requires a client certificate that chains to the cluster
CA, the client checks that the server's certificate names the address it dialled.
sendfile cannot encrypt, so the server then reads a stored piece in ``tls_slice``
slices in a worker thread, encrypts them there (AES-GCM in OpenSSL, without the GIL)
and writes them to the socket; the client's worker thread decrypts from memory into
its buffer (see "TLS" below for why neither uses asyncio's TLS or an SSLSocket).
Plaintext is unchanged. This kernel has no kTLS (CONFIG_TLS is off), and Python
3.11's ssl has no OP_ENABLE_KTLS nor SSL_sendfile, so sendfile under TLS is out.

Bounds (``security.limits``, their defaults in bare use): the server holds at most
``piece_connections`` connections (past it, a new one is closed at once, before any
handshake), closes a connection that sends no request for ``piece_idle_timeout``
seconds (or does not finish its handshake in that time), and a child drops a
connection whose parent sent more than ``vortex_error_frames`` Error frames.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import FileRegion, PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, NotFound, PeerError, ProtocolError
from damselfly.hookspecs import hookimpl
from damselfly.kit import (
    SEND_SLICE,
    ParentRefused,
    PieceResponse,
    StreamChannel,
    StreamServer,
    answer,
    limits_of,
    serve_requests,
    split_address,
    tls_of,
)
from damselfly.security.tls import client_ssl_context, server_ssl_context

if TYPE_CHECKING:
    from damselfly.contracts import Registry


class TcpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    read_buffer: int = Field(1 << 20, ge=4096, description="Bytes read from the socket at a time (per connection).")
    socket_buffer: int = Field(0, ge=0, description="SO_RCVBUF/SO_SNDBUF to ask for (0: the kernel's default).")
    sendfile: bool = Field(True, description="Send stored pieces with sendfile(2) when they lie in a file.")
    tls_slice: int = Field(
        256 * 1024, ge=16 * 1024, description="Under TLS, bytes of a stored piece read and encrypted at a time."
    )
    tls_connections: int = Field(
        4,
        ge=1,
        description="Connections a child opens to one parent under TLS (16 in plaintext): each decrypts in its own "
        "thread, a record at a time, and more threads contend for the GIL more than they add.",
    )


def _tune(sock: socket.socket | None, buffer: int = 0) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)


# -- server -----------------------------------------------------------------------
#
# The kit's ``StreamServer`` bounds the connections and ``serve_requests`` reads each
# one's requests; a plaintext connection is the kit's ``StreamChannel``, its stored
# pieces sent by sendfile (``_send_piece``); a TLS one is a ``_TlsChannel``.


# -- TLS, the parent's side -----------------------------------------------------------------
#
# The parent's TLS is an SSLObject over memory BIOs on the plain asyncio connection, not
# asyncio's own TLS transport: requests are read and decrypted on the event loop (they are
# small), but a stored piece is read, encrypted and written to the socket by a worker
# thread, ``tls_slice`` bytes at a time, as sendfile does in plaintext. The SSLObject is
# used by one thread at a time: the loop waits for the thread before it reads again. The
# loop's own writes (a handshake, an Error frame, a piece held in memory) are flushed to
# the socket before the thread writes (the transport's high-water mark is 0).


class _TlsChannel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        idle_timeout: float,
        slice_size: int,
    ):
        self.reader, self.writer, self.idle_timeout, self.slice_size = reader, writer, idle_timeout, slice_size
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending: list[bytes | memoryview] = []  # plaintext written, encrypted at the next drain
        writer.transport.set_write_buffer_limits(high=0)  # drain() returns once all is on the wire

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())

    async def _fill(self) -> bool:
        async with asyncio.timeout(self.idle_timeout):
            data = await self.reader.read(65536)
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()  # TLS 1.3: the session tickets
                await self.writer.drain()
                return
            except ssl.SSLWantReadError:
                self._flush()
                await self.writer.drain()
                if not await self._fill():
                    raise ConnectionError("the child closed the connection during the handshake") from None
            except ssl.SSLError:
                self._flush()  # the alert, so the child learns why
                raise

    async def read(self) -> bytes:
        """Plaintext (b"" at the end of the stream); TimeoutError after ``idle_timeout`` without a byte."""
        while True:
            try:
                data = self.obj.read(65536)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:  # close_notify
                return b""

    def write(self, data: bytes | memoryview) -> None:
        self.pending.append(data)

    async def drain(self) -> None:
        for data in self.pending:
            self.obj.write(data)
        self.pending.clear()
        self._flush()
        await self.writer.drain()

    async def send_piece(self, lookup: PieceLookup, req: vortex.DownloadPiece) -> None:
        await answer(self, lookup, req, self.slice_size, self._send_region)
        if self.pending:  # an empty piece's header: ``answer`` had nothing to drain after it
            await self.drain()

    async def _send_region(self, region: FileRegion) -> None:
        """The piece frame's header (still pending) and the stored piece, encrypted and sent by a worker thread."""
        head = b"".join(self.pending)
        self.pending.clear()
        await self.writer.drain()  # whatever the loop wrote is on the wire before the thread writes
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            raise PeerError("the connection has no socket to send on")
        fd = os.dup(sock.fileno())  # the thread's own descriptor, as for sendfile
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(_SEND_THREADS, self._encrypt_and_send, fd, head, region)
        job.add_done_callback(lambda _: os.close(fd))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if not job.done():
                _shutdown(fd)
            raise

    def _encrypt_and_send(self, fd: int, head: bytes, region: FileRegion) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        view = _thread_buffer(self.slice_size, "tls_send")
        self.obj.write(head)
        try:
            f = open(region.path, "rb")  # noqa: SIM115 (the with below closes it)
        except OSError as exc:
            raise PeerError(f"cannot read the stored piece: {exc}") from exc
        with f:
            offset, left = region.offset, region.length
            while left:
                try:
                    n = os.preadv(f.fileno(), [view[: min(left, len(view))]], offset)
                except OSError as exc:
                    raise PeerError(f"cannot read the stored piece: {exc}") from exc
                if n == 0:
                    raise PeerError(f"piece cut short on disk, {left} of {region.length} bytes unsent")
                self.obj.write(view[:n])  # encrypts without the GIL
                _write_all(fd, self.outgoing.read(), poller)
                offset += n
                left -= n
        if self.outgoing.pending:
            _write_all(fd, self.outgoing.read(), poller)


def _write_all(fd: int, data: bytes, poller: select.poll) -> None:
    """All of ``data`` to the non-blocking socket ``fd``, waiting (without the GIL) while its buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            if not poller.poll(SEND_STALL_SECONDS * 1000):
                raise PeerError(f"the child took nothing for {SEND_STALL_SECONDS:.0f} s") from None
            continue
        except OSError as exc:
            raise PeerError(f"send failed: {exc}") from exc
        view = view[sent:]


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


def _thread_buffer(size: int, name: str = "view") -> memoryview:
    """This worker thread's buffer ``name``: a fetch runs on one thread, so connections share them."""
    view: memoryview | None = getattr(_buffers, name, None)
    if view is None or len(view) != size:
        view = memoryview(bytearray(size))
        setattr(_buffers, name, view)
    return view


class TcpConnection(PieceConnection):
    def __init__(
        self,
        sock: socket.socket,
        read_buffer: int,
        max_errors: int = vortex.DEFAULT_MAX_ERRORS,
        tls: _ClientTls | None = None,
    ):
        self._sock = sock
        self._read_buffer = read_buffer
        self._tls = tls
        # one decoder for the connection's life: it counts the parent's Error frames across requests
        self._decoder = vortex.Decoder(max_errors=max_errors)
        self._busy = False
        self._turn = asyncio.Lock()
        self._lost: Exception | None = None

    @property
    def broken(self) -> bool:
        if self._lost is None and not self._busy and not self._turn.locked():
            self._check_idle()
        return self._lost is not None

    def _check_idle(self) -> None:
        """An idle connection the parent has closed (its idle timeout, a restart) is broken now, before
        a fetch finds out and blames the parent. One non-blocking look at the socket."""
        try:
            if self._tls is not None:
                if self._tls.poll():
                    return
                raise ConnectionError("the parent ended the connection")
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # nothing to read: open and idle, as it should be
        except (OSError, ProtocolError) as exc:
            self._fail(PeerError(f"idle connection lost: {exc}"))
            return
        self._fail(PeerError("the parent closed the idle connection" if not data else "bytes nobody asked for"))

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
        resp = PieceResponse(number, decoder=self._decoder)
        try:
            if self._tls is not None:
                self._tls.sendall(vortex.encode_download_piece(task_id, number))
                _receive_tls(self._tls, view, resp, sink)
                assert resp.metadata is not None
                return resp.metadata
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
        except OSError as exc:  # ssl.SSLError included: a refused certificate shows here under TLS 1.3
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
                if self._tls is not None:
                    self._tls.sendall(vortex.encode_close())
                else:
                    self._sock.sendall(vortex.encode_close())
            except OSError:
                pass
        self._fail(PeerError("closed"))
        self._sock.close()


# -- TLS, the child's side ----------------------------------------------------------------
#
# The child's TLS runs in its fetch thread on an SSLObject over memory BIOs rather than an
# SSLSocket: a TLS read returns at most one 16 KiB record, and an SSLSocket makes two
# syscalls per record (its header, then its body). Here one recv takes whatever the
# kernel holds (up to ``_TLS_RECV``) into the incoming BIO and the records are decrypted
# from memory, straight into the fetch's buffer. Measured on this machine: about 20%
# less CPU per byte on the child than an SSLSocket.

_TLS_RECV = 256 * 1024


class _ClientTls:
    """One connection's TLS state (blocking, used by one thread at a time: the connection's turn)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=host)

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()  # TLS 1.3: our certificate and Finished are still to go
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("the parent closed the connection during the TLS handshake") from None

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _fill(self) -> bool:
        """Ciphertext from the socket into the incoming BIO; False at the end of the stream."""
        view = _thread_buffer(_TLS_RECV, "tls_recv")
        n = self.sock.recv_into(view)
        if n == 0:
            return False
        self.incoming.write(view[:n])
        return True

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def poll(self) -> bool:
        """While the connection is idle: take what the parent sent without blocking (TLS 1.3 session
        tickets, an alert, the end); True while it is still usable, BlockingIOError if nothing came."""
        scratch = bytearray(16 * 1024)
        n = self.sock.recv_into(scratch, len(scratch), socket.MSG_DONTWAIT)
        if n == 0:
            return False
        self.incoming.write(memoryview(scratch)[:n])
        try:
            self.obj.read(1)  # handshake messages are taken; any plaintext is out of step
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLError:  # close_notify or another alert
            return False
        raise ProtocolError("the parent sent bytes nobody asked for")

    def recv_into(self, view: memoryview) -> int:
        """Plaintext into ``view``: at least one byte, at most one record; 0 at the end of the stream."""
        while True:
            try:
                return self.obj.read(len(view), view)
            except ssl.SSLWantReadError:
                self._flush()  # a reply to a key update, say
                if not self._fill():
                    return 0
            except ssl.SSLZeroReturnError:  # close_notify
                return 0


def _receive_tls(tls: _ClientTls, view: memoryview, resp: PieceResponse, sink: PieceWriter) -> None:
    """The answer to one request under TLS, into ``sink``: inside a piece, the buffer is filled
    record by record, then handed to the decoder and the storage whole, as the plaintext path does."""
    size = len(view)
    while not resp.done:
        left = resp.piece_left
        if left:
            want = min(left, size)
            n = 0
            while n < want:
                got = tls.recv_into(view[n:want])
                if not got:
                    break
                n += got
        else:  # a frame head: read little, so the decoder never buffers piece bytes
            n = tls.recv_into(view[:_HEAD_READ])
        for chunk in resp.feed(view[:n]):
            sink.write(chunk)
        if n == 0:
            raise PeerError("parent closed the connection")


def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> _ClientTls:
    """TLS on a connected socket, in a worker thread (the socket's timeout bounds it)."""
    try:
        tls = _ClientTls(sock, context, host)
        tls.handshake()
        return tls
    except BaseException:
        sock.close()
        raise


class TcpTransport(Transport):
    name: ClassVar[str] = "tcp"
    Config = TcpConfig
    options: TcpConfig
    _client_context: ssl.SSLContext | None = None

    @property  # type: ignore[misc]
    def connections_per_parent(self) -> int:  # type: ignore[override]
        """A request holds its connection until its piece is in: many in plaintext, fewer under TLS (see
        ``tls_connections``)."""
        return self.options.tls_connections if tls_of(self.security) is not None else 16

    def _client_tls(self) -> ssl.SSLContext | None:
        cfg = tls_of(self.security)
        if cfg is None:
            return None
        if self._client_context is None:  # once: loading the key and the CA per connection costs milliseconds
            self._client_context = client_ssl_context(cfg)
        return self._client_context

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        server = StreamServer(limits_of(self.security))
        limits = server.limits
        cfg = tls_of(self.security)
        context = server_ssl_context(cfg) if cfg is not None else None
        # connections still in their TLS handshake, by source address: one address may not hold
        # the server's connections with handshakes that never come (they also end after header_timeout)
        shaking: dict[str, int] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not server.admit(writer):
                return
            source = str((writer.get_extra_info("peername") or ("",))[0])
            if context is not None and shaking.get(source, 0) >= HANDSHAKES_PER_ADDRESS:
                server.refuse(writer, HANDSHAKES_PER_ADDRESS)
                return
            await server.hold(writer, connection(reader, writer, source))

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
            peer = writer.get_extra_info("peername")
            _tune(writer.get_extra_info("socket"))
            if context is None:
                loop, sendfile = asyncio.get_running_loop(), self.options.sendfile
                channel = StreamChannel(reader, writer, limits.piece_idle_timeout)
                await serve_requests(channel, peer, lambda req: _send_piece(writer, loop, lookup, req, sendfile))
                return
            tls = _TlsChannel(reader, writer, context, limits.piece_idle_timeout, self.options.tls_slice)
            shaking[source] = shaking.get(source, 0) + 1
            try:
                await asyncio.wait_for(tls.handshake(), min(limits.header_timeout, limits.piece_idle_timeout))
            except (OSError, TimeoutError) as exc:  # ssl.SSLError: a missing or foreign certificate
                logger.warning("refusing a piece connection from {}: TLS handshake failed: {!r}", peer, exc)
                return
            finally:
                if shaking[source] <= 1:
                    del shaking[source]
                else:
                    shaking[source] -= 1
            try:
                await serve_requests(tls, peer, lambda req: tls.send_piece(lookup, req))
            except ssl.SSLError:
                return

        listener = await asyncio.start_server(handle, host, port, reuse_address=True)
        return server.listening(listener)

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        host, port = split_address(address)
        context = self._client_tls()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(_FETCH_THREADS, socket.create_connection, (host, port), timeout)
        except OSError as exc:
            raise PeerError(f"cannot connect to {address} after {time.monotonic() - started:.1f}s: {exc}") from None
        _tune(sock, self.options.socket_buffer)
        tls = None
        if context is not None:
            try:
                tls = await loop.run_in_executor(_FETCH_THREADS, _handshake, sock, context, host)
            except (OSError, ValueError) as exc:  # ssl.SSLError and SSLCertVerificationError are OSErrors
                raise PeerError(f"TLS handshake with {address} failed: {exc}") from None
        sock.settimeout(None)
        return TcpConnection(sock, self.options.read_buffer, limits_of(self.security).vortex_error_frames, tls)


HANDSHAKES_PER_ADDRESS = 64  # TLS handshakes one source address may have unfinished at once


@hookimpl
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    registry.add(TcpTransport)
