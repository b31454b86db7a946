"""The transport kit's exchange: both halves of a Vortex request, written once for every transport.

A transport plugin moves bytes; the Vortex codec (``core.vortex``) turns them into
frames. This module holds what sits between them, the same for TCP, QUIC, WebRTC,
RDMA and any third-party transport:

- ``RequestReader`` (sans-IO): the parent's side of a connection. A child's bytes in,
  its requests out, bounded as the codec bounds them: a frame that is not a
  DownloadPiece, a Close or a small Error is refused from its header, so a reader
  holds at most one request's bytes beyond what it was last fed.
- ``answer``: the parent's side of one DownloadPiece request. It looks the piece up,
  writes an Error frame when that fails, or the piece frame in slices, awaiting the
  transport's ``drain`` between slices so a slow child holds back the sender.
- ``PieceResponse`` (sans-IO): the child's side. Bytes in, piece bytes for the storage
  writer out, and the piece's metadata once the frame is whole. It raises ``NotFound``
  for a NOT_FOUND frame (``Busy``, ``Declined`` for theirs), ``ParentRefused`` for any
  other Error frame (the connection stays usable) and ``ProtocolError`` for a frame that
  lies or breaks the format.
- ``PendingResponse``: a ``PieceResponse`` fed by a transport's receive callback and
  drained into the storage by the fetching coroutine (QUIC, WebRTC, RDMA).

The crc32 of the piece is checked by the storage writer's ``commit`` against the
digest in the metadata these return; nothing here holds a whole piece in memory.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger

from damselfly.config import LimitsConfig, TlsConfig
from damselfly.contracts import INLINE_WRITE_LIMIT, FileRegion, PieceLookup, PieceWriter, ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import Busy, Declined, InvalidArgument, NotFound, PeerError, ProtocolError

SEND_SLICE = 256 * 1024  # piece bytes ``answer`` writes between two drains


class ParentRefused(PeerError):
    """An Error frame other than NOT_FOUND: this request failed, the connection did not."""


class FrameSink(Protocol):
    """Where ``answer`` writes a frame: ``write`` buffers, ``drain`` waits while the child is slow."""

    def write(self, data: bytes | memoryview) -> None: ...

    async def drain(self) -> None: ...


def limits_of(security: Any) -> LimitsConfig:
    """The connection bounds of ``security`` (a SecurityConfig), or the defaults in bare use: bounded either way."""
    if security is not None:
        limits: LimitsConfig = security.limits
        return limits
    return LimitsConfig.model_validate({})


def tls_of(security: Any) -> TlsConfig | None:
    """``security.tls`` when mutual TLS is configured, else None (plaintext)."""
    tls: TlsConfig | None = security.tls if security is not None else None
    return tls if tls is not None and tls.enabled else None


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) as a host and a port, or a one-line InvalidArgument."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise InvalidArgument(f"bad piece address {address!r}, expected host:port")
    return host, int(port)


def error_frame(exc: BaseException, packet_id: int = 0) -> bytes:
    """The Error frame a failed lookup becomes."""
    if isinstance(exc, Declined):
        code = vortex.ErrorCode.DECLINED
    elif isinstance(exc, Busy):
        code = vortex.ErrorCode.UNAVAILABLE
    elif isinstance(exc, NotFound):
        code = vortex.ErrorCode.NOT_FOUND
    elif isinstance(exc, InvalidArgument):
        code = vortex.ErrorCode.INVALID_ARGUMENT
    else:
        code = vortex.ErrorCode.INTERNAL
    return vortex.encode_error(code, str(exc) or type(exc).__name__, packet_id)


# -- the parent's side ---------------------------------------------------------------


class RequestReader:
    """A child's bytes in, its requests out; sans-IO, one per connection (or per stream).

    ``receive_data`` takes bytes (``b""`` for the end of the stream); ``next_request``
    returns the next whole request, or None until more bytes come. Anything else a
    child sends raises ``ProtocolError``, after which the reader stays broken, as the
    codec's decoder does: the transport answers with an INVALID_ARGUMENT Error frame
    and hangs up.
    """

    def __init__(self) -> None:
        self._decoder = vortex.Decoder(max_frame=vortex.DOWNLOAD_PIECE_SIZE)
        self._broken: ProtocolError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.receive_data(data)

    def next_request(self) -> vortex.DownloadPiece | vortex.Close | None:
        """A DownloadPiece, a Close (the child ends the session), or None when more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        event = self._decoder.next_event()
        if event is vortex.NEED_DATA:
            return None
        if isinstance(event, vortex.DownloadPiece | vortex.Close):
            return event
        self._broken = ProtocolError(f"unexpected {type(event).__name__} from a child")
        raise self._broken

    def requests(self, data: bytes | bytearray | memoryview) -> list[vortex.DownloadPiece | None]:
        """The requests ``data`` completes, in order, None for a Close: for transports that receive
        whole messages (a data channel, an RDMA receive) rather than a byte stream."""
        self.receive_data(data)
        out: list[vortex.DownloadPiece | None] = []
        while (req := self.next_request()) is not None:
            out.append(req if isinstance(req, vortex.DownloadPiece) else None)
        return out


def read_region(region: FileRegion, offset: int = 0, length: int | None = None) -> bytes:
    """Bytes of a stored piece from its file (blocking: a worker thread calls it)."""
    length = region.length - offset if length is None else length
    with open(region.path, "rb") as f:
        return os.pread(f.fileno(), length, region.offset + offset)


async def answer(
    sink: FrameSink,
    lookup: PieceLookup,
    req: vortex.DownloadPiece,
    slice_size: int = SEND_SLICE,
    send_region: Callable[[FileRegion], Awaitable[None]] | None = None,
) -> None:
    """Answer one request on ``sink``; ``send_region`` may send a stored piece its own way (sendfile).

    Raises ``PeerError`` when the stored piece turns out shorter than its metadata
    after the header went out: the transport must then abort the stream or the
    connection, never send a shorter frame.
    """
    try:
        served = await lookup(req.task_id, req.number)
    except Exception as exc:  # every lookup failure reaches the child as an Error frame
        if not isinstance(exc, NotFound | InvalidArgument):
            logger.warning("serving piece {} of {} failed: {}", req.number, req.task_id[:12], exc)
        sink.write(error_frame(exc, req.packet_id))
        await sink.drain()
        return
    try:
        await _send(sink, served, req, slice_size, send_region)
    finally:
        if served.release is not None:
            served.release()


async def _send(
    sink: FrameSink,
    served: ServedPiece,
    req: vortex.DownloadPiece,
    slice_size: int,
    send_region: Callable[[FileRegion], Awaitable[None]] | None,
) -> None:
    length = served.metadata.length
    sink.write(vortex.encode_piece_header(served.metadata, req.packet_id))
    if served.region is None:
        view = memoryview(served.data or b"")
        if len(view) != length:
            raise PeerError(f"piece {req.number} holds {len(view)} bytes, its metadata says {length}")
        for i in range(0, length, slice_size):
            sink.write(view[i : i + slice_size])
            await sink.drain()
        return
    region = served.region
    if send_region is not None:
        await send_region(region)
        return
    for i in range(0, length, slice_size):
        want = min(slice_size, length - i)
        chunk = await asyncio.to_thread(read_region, region, i, want)
        if len(chunk) != want:
            raise PeerError(f"piece {req.number} is cut short on disk at {i + len(chunk)} of {length} bytes")
        sink.write(chunk)
        await sink.drain()


# -- the child's side ----------------------------------------------------------------


class PieceResponse:
    """The child's decoder for the answer to one request for piece ``number``; sans-IO."""

    def __init__(self, number: int, max_frame: int = vortex.DEFAULT_MAX_FRAME, decoder: vortex.Decoder | None = None):
        """``decoder``: the connection's own, when its byte stream carries one response after another, so
        that it counts the connection's Error frames (see ``vortex.Decoder``); a fresh one otherwise."""
        self.number = number
        self.decoder = decoder if decoder is not None else vortex.Decoder(max_frame)
        self.metadata: vortex.PieceMetadata | None = None
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Take bytes (``b""`` for the end of the stream); return the piece bytes they complete."""
        self.decoder.receive_data(data)
        out: list[memoryview] = []
        while not self.done:
            try:
                event = self.decoder.next_event()
            except vortex.ErrorFlood as exc:  # too many errors, not a lie: the connection goes, no blame
                raise PeerError(f"dropping the connection: {exc}") from None
            except ProtocolError as exc:
                if not data:  # cut off mid-frame: the parent vanished, it did not lie
                    raise PeerError(f"parent hung up: {exc}") from None
                raise
            if event is vortex.NEED_DATA:
                if not data:
                    raise PeerError("parent ended the stream before the piece was whole")
                break
            if isinstance(event, vortex.PieceData):
                out.append(event.data)
            elif isinstance(event, vortex.PieceContentStart):
                if event.metadata.number != self.number:
                    raise ProtocolError(f"lying parent: asked for piece {self.number}, got {event.metadata.number}")
                self.metadata = event.metadata
            elif isinstance(event, vortex.PieceContentEnd):
                self.done = True
            elif isinstance(event, vortex.Error):
                self.done = True
                if event.code == vortex.ErrorCode.NOT_FOUND:
                    raise NotFound(f"parent: {event.message}")
                if event.code == vortex.ErrorCode.UNAVAILABLE:
                    raise Busy(f"parent: {event.message}")
                if event.code == vortex.ErrorCode.DECLINED:
                    raise Declined(f"parent: {event.message}")
                raise ParentRefused(f"parent error {event.code}: {event.message}")
            elif isinstance(event, vortex.Close):
                raise PeerError("parent closed the Vortex session")
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} from parent")
        return out

    @property
    def piece_left(self) -> int:
        """Piece bytes still to come in the current frame (0 before the header and after the end)."""
        return self.decoder.piece_left


class PendingResponse:
    """One request's answer arriving on an event loop, waiting for the storage to take it.

    The transport's receive callback calls ``receive``; the fetching coroutine runs
    ``deliver``. ``received - buffered`` is how many of the response's bytes the
    storage has taken: a transport grants the parent credit from it.
    """

    def __init__(self, number: int, decoder: vortex.Decoder | None = None):
        self.response = PieceResponse(number, decoder=decoder)
        self.chunks: list[memoryview] = []
        self.received = 0
        self.buffered = 0
        self.batch = 0  # ``deliver`` wants waking only once this much is buffered (or at the end)
        self.inline = True  # storage writes on the loop while they stay fast
        self.error: Exception | None = None
        self.changed = asyncio.Event()

    def receive(self, data: bytes, end: bool = False) -> None:
        parts: list[memoryview] = []
        self.received += len(data)
        try:
            if data and not self.response.done:
                parts = self.response.feed(data)
            if end and not self.response.done:
                self.response.feed(b"")
        except Exception as exc:  # handed to the coroutine waiting in ``deliver``
            self.error = self.error or exc
        self.chunks += parts
        self.buffered += sum(len(c) for c in parts)
        if self.buffered >= self.batch or self.response.done or self.error is not None or end:
            self.changed.set()  # not on every packet: a wakeup per datagram costs more than the copy

    def fail(self, exc: Exception) -> None:
        self.error = self.error or exc
        self.changed.set()

    async def deliver(self, sink: PieceWriter, batch: int, taken: Callable[[int], None]) -> vortex.PieceMetadata:
        """Hand piece bytes to ``sink`` in a worker thread, ``batch`` bytes at a time at least."""
        self.batch = batch
        if self.buffered >= batch:
            self.changed.set()
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.buffered < batch and not self.response.done and self.error is None:
                continue  # big writes: a thread hop per packet would cost more than the copy
            chunks, self.chunks = self.chunks, []
            self.buffered -= sum(len(c) for c in chunks)
            if chunks:
                if self.inline:
                    started = time.perf_counter()
                    write_all(sink, chunks)
                    # the page cache takes a batch in tens of microseconds; a thread hop costs
                    # more than that on a busy loop. A slow write (a disk under writeback, a
                    # slow storage) moves this response's writes to a worker thread for good.
                    if time.perf_counter() - started > INLINE_WRITE_LIMIT:
                        self.inline = False
                else:
                    await asyncio.to_thread(write_all, sink, chunks)
            taken(self.received - self.buffered)
            if self.chunks:
                self.changed.set()  # more came while the storage wrote
                continue
            if self.error is not None:
                raise self.error
            if self.response.done:
                assert self.response.metadata is not None
                return self.response.metadata


def write_all(sink: PieceWriter, chunks: list[memoryview]) -> None:
    """Every chunk to the storage writer, in order (blocking where the storage is: may run in a thread)."""
    for c in chunks:
        sink.write(c)
