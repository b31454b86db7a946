"""HTTP/2 framing for gRPC, sans-IO: one end of a connection as a state machine.

:class:`Framing` turns bytes into frames and frames into calls of its hooks, and the
server's and client's sends into bytes: RFC 9113 framing, settings, PING, flow control
(per stream and per connection), HPACK decoding (through the ``hpack`` package, with a
cache for the blocks a client sends on every call), and gRPC's length-prefixed messages.
It opens no socket and reads no clock: bytes arrive by :meth:`Framing.data_received` and
leave through :attr:`Framing.out` (:meth:`Framing.data_to_send`), so two of them talk in
memory in the tests; :class:`damselfly.rpc.endpoint.Endpoint` binds one to an asyncio
transport.

The framing's interface to the ends (:mod:`damselfly.rpc.server`, :mod:`damselfly.rpc.client`)
is the ``_send_*`` methods, :meth:`Framing._reset`, :meth:`Framing._goaway`,
:meth:`Framing._local_done` and the ``streams`` table one way, and the ``_on_*`` hooks and
``_message`` the other; ``benchmarks/rpc_framing.py`` implements it on hyper-h2.

HPACK on the way out: :func:`encode_headers` writes literals that touch no dynamic table,
so a precomputed block stays valid on every connection (the server's responses); the
client indexes its own (:mod:`damselfly.rpc.client`).
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from hpack import Decoder
from hpack.exceptions import HPACKError
from loguru import logger

if TYPE_CHECKING:
    import asyncio  # a Stream's ``drained`` future only: the framing itself runs no loop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

FRAME_HEADER = struct.Struct(">BHBBI")  # 24-bit length as 8 + 16 bits, type, flags, stream id
U32 = struct.Struct(">I")
MESSAGE_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length
_SETTING = struct.Struct(">HI")

WINDOW = 1 << 24  # what we let a peer send before it hears from us, per stream and per connection
MAX_FRAME = 1 << 20  # the largest frame we accept
MAX_MESSAGE = 16 << 20  # the largest gRPC message we accept
DEFAULT_MAX_FRAME = 16384
DEFAULT_WINDOW = 65535

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class H2Error(Exception):
    """The peer broke HTTP/2; the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, sid) + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a ``prefix_bits`` prefix, ``first`` in the bits above."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_str(data: bytes) -> bytes:
    return hpack_int(len(data), 7) + data  # no Huffman coding: the peer's decoder takes both


def encode_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """An HPACK block that touches no dynamic table: each field a literal without indexing,
    so one precomputed block stays valid on every connection."""
    out = bytearray()
    for name, value in headers:
        n = name.encode() if isinstance(name, str) else name
        v = value.encode() if isinstance(value, str) else value
        out += b"\x00" + hpack_str(n) + hpack_str(v)
    return bytes(out)


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


def encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """gRPC metadata as header fields: keys lowercased, ``-bin`` values in unpadded base64."""
    out = []
    for key, value in metadata:
        k = key.lower()
        if k.endswith("-bin"):
            v = value if isinstance(value, bytes) else value.encode()
            out.append((k.encode(), base64.b64encode(v).rstrip(b"=")))
        else:
            out.append((k.encode(), value.encode() if isinstance(value, str) else value))
    return out


def decode_metadata(headers: Iterable[tuple[bytes, bytes]], skip: frozenset[bytes]) -> tuple[Metadatum, ...]:
    """The metadata among ``headers``: no pseudo-header, nothing in ``skip``; ``-bin`` decoded.

    A ``-bin`` value that is not base64 is the peer's protocol error (:class:`H2Error`).
    """
    out = []
    for k, v in headers:
        if k[:1] == b":" or k in skip:
            continue
        key = k.decode("ascii", "replace")
        if key.endswith("-bin"):
            try:
                out.append(Metadatum(key, base64.b64decode(v + b"=" * (-len(v) % 4))))
            except binascii.Error:
                raise H2Error(PROTOCOL_ERROR, f"malformed binary metadata {key!r}") from None
        else:
            out.append(Metadatum(key, v.decode("utf-8", "replace")))
    return tuple(out)


def parse_timeout(value: bytes) -> float | None:
    """Seconds in a ``grpc-timeout`` value (at most 8 digits and a unit); None if malformed."""
    text = value.decode("ascii", "replace")
    if len(text) < 2 or len(text) > 9 or not text[:-1].isdigit() or text[-1] not in _TIMEOUT_UNITS:
        return None
    return int(text[:-1]) * _TIMEOUT_UNITS[text[-1]]


class Stream:
    """What both ends keep for one stream: flow-control windows, queued output, reassembly."""

    __slots__ = (
        "drained",
        "local_closed",
        "pending",
        "pending_end",
        "rbuf",
        "remote_closed",
        "sid",
        "trailers",
        "unacked",
        "window",
    )

    def __init__(self, sid: int, window: int):
        self.sid = sid
        self.window = window
        self.pending = bytearray()  # DATA payload waiting for window
        self.pending_end = False
        self.trailers: bytes | None = None  # a header block to send once pending is out
        self.rbuf = bytearray()
        self.unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.drained: asyncio.Future[None] | None = None  # set when pending is out (a writer waits on it)


class Framing:
    """Framing, settings, PING, flow control and header decoding shared by both ends.

    Subclasses implement the hooks (``_on_headers``, ``_message``, ``_message_too_big``,
    ``_on_remote_end``, ``_on_reset``; ``_on_goaway`` and ``_on_table_size`` if they care)
    and may override :meth:`_schedule_flush` and :meth:`_close` to move the bytes.
    """

    is_client = False
    max_streams = 1 << 16  # what we advertise in SETTINGS_MAX_CONCURRENT_STREAMS

    def __init__(self) -> None:
        self.buf = bytearray()
        self.out = bytearray()  # bytes to send, in order
        self._flush_scheduled = False
        self.decoder = Decoder()
        self._header_cache: dict[bytes, tuple[int, object, list[tuple[bytes, bytes]]]] = {}
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self.conn_unacked = 0
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with output waiting for window
        self.headers_sid = 0  # a header block in progress (CONTINUATION follows)
        self.headers_flags = 0
        self.headers_block = bytearray()
        self.preface_seen = self.is_client
        self.closed = False
        self.peer_name = ""  # for logs; the endpoint sets it

    # -- output -----------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue what an end sends first: the client's preface, then our settings."""
        self._write((PREFACE if self.is_client else b"") + self._settings_frame())

    def data_to_send(self) -> bytes:
        """Take the bytes queued for the peer."""
        data = bytes(self.out)
        self.out.clear()
        self._flush_scheduled = False
        return data

    def _schedule_flush(self) -> None:
        """Called once when output is queued and no flush is scheduled: an endpoint arranges
        to write :attr:`out` soon (one write for everything queued meanwhile)."""

    def _close(self) -> None:
        """The connection is over (we sent GOAWAY): an endpoint writes what is queued and closes."""
        self.closed = True

    def _write(self, data: bytes) -> None:
        self.out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule_flush()

    def _settings_frame(self) -> bytes:
        payload = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, self.max_streams),
                (S_INITIAL_WINDOW_SIZE, WINDOW),
                (S_MAX_FRAME_SIZE, MAX_FRAME),
            )
        )
        return frame(SETTINGS, 0, 0, payload) + frame(WINDOW_UPDATE, 0, 0, U32.pack(WINDOW - DEFAULT_WINDOW))

    def _send_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        """A header block (HPACK-encoded already), in CONTINUATION frames past the peer's frame size."""
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self._write(frame(HEADERS, flags | END_HEADERS, sid, block))
            return
        self._write(frame(HEADERS, flags, sid, block[:limit]))
        rest = block[limit:]
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            self._write(frame(CONTINUATION, 0 if rest else END_HEADERS, sid, chunk))

    def _send_message(self, st: Stream, data: bytes, end_stream: bool = False) -> None:
        """One serialized gRPC message, length-prefixed, as DATA."""
        n = len(data) + 5
        if n <= self.send_window and n <= st.window and n <= self.peer_max_frame and not (st.pending or st.pending_end):
            # the common case, a small message within the windows: one frame, built in place
            self.send_window -= n
            st.window -= n
            out = self.out
            out += FRAME_HEADER.pack(n >> 16, n & 0xFFFF, DATA, END_STREAM if end_stream else 0, st.sid)
            out += MESSAGE_PREFIX.pack(0, n - 5)
            out += data
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._schedule_flush()
            return
        self._send_data(st, MESSAGE_PREFIX.pack(0, len(data)) + data, end_stream)

    def _send_data(self, st: Stream, payload: bytes, end_stream: bool = False) -> None:
        """DATA as far as the windows allow; the rest waits in ``st.pending``."""
        if st.pending or st.pending_end:
            st.pending += payload
            st.pending_end = st.pending_end or end_stream
            return
        n = max(0, min(len(payload), self.send_window, st.window))  # a window may be negative (RFC 9113 6.9.2)
        if n == len(payload):
            self._emit_data(st, payload, end_stream)
            return
        if n > 0:
            self._emit_data(st, payload[:n], False)
        st.pending += payload[n:]
        st.pending_end = end_stream
        self.blocked[st.sid] = st

    def _emit_data(self, st: Stream, payload: bytes, end_stream: bool) -> None:
        n = len(payload)
        self.send_window -= n
        st.window -= n
        limit = self.peer_max_frame
        if n <= limit:
            self._write(frame(DATA, END_STREAM if end_stream else 0, st.sid, payload))
            return
        view = memoryview(payload)
        for off in range(0, n, limit):
            last = off + limit >= n
            self._write(frame(DATA, END_STREAM if end_stream and last else 0, st.sid, bytes(view[off : off + limit])))

    def _drain_blocked(self) -> None:
        for sid, st in list(self.blocked.items()):
            n = min(len(st.pending), self.send_window, st.window)
            if n <= 0 and st.pending:
                continue
            chunk = bytes(st.pending[:n])
            del st.pending[:n]
            done = not st.pending
            if chunk or (done and st.pending_end):
                self._emit_data(st, chunk, done and st.pending_end)
            if done:
                del self.blocked[sid]
                st.pending_end = False
                if st.trailers is not None:
                    block, st.trailers = st.trailers, None
                    self._send_headers(sid, block, True)
                    self._local_done(st)
                if st.drained is not None and not st.drained.done():
                    st.drained.set_result(None)
            if self.send_window <= 0:
                break

    def _reset(self, sid: int, code: int) -> None:
        """RST_STREAM ``sid`` with ``code``; the stream is forgotten."""
        self._write(frame(RST_STREAM, 0, sid, U32.pack(code)))
        self.streams.pop(sid, None)
        self.blocked.pop(sid, None)

    def _goaway(self, last_sid: int, code: int = NO_ERROR, message: bytes = b"") -> None:
        """GOAWAY: the peer's streams past ``last_sid`` will not be processed."""
        self._write(frame(GOAWAY, 0, 0, U32.pack(last_sid) + U32.pack(code) + message))

    # -- input ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer: frames are handled as they complete, the rest is kept."""
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        try:
            off = 0
            if not self.preface_seen:
                n = len(PREFACE)
                if not (PREFACE.startswith(data[:n])):
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                if len(data) < n:
                    self.buf += data
                    return
                off = n
                self.preface_seen = True
            end = len(data)
            unpack = FRAME_HEADER.unpack_from
            while end - off >= 9:
                hi, lo, kind, flags, sid = unpack(data, off)
                length = hi << 16 | lo
                if length > MAX_FRAME:
                    raise H2Error(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - off - 9 < length:
                    break
                start = off + 9
                off = start + length
                if kind == DATA and not self.headers_sid:
                    self._on_data(flags, sid & 0x7FFFFFFF, data[start:off])  # most frames: skip _frame
                else:
                    self._frame(kind, flags, sid & 0x7FFFFFFF, data[start:off])
                if self.closed:
                    return
            if off < end:
                self.buf += data[off:]
            self._ack_windows()
        except H2Error as exc:
            self._fail(exc.code, str(exc))

    def _ack_windows(self) -> None:
        if self.conn_unacked >= WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.conn_unacked)))
            self.conn_unacked = 0

    def _fail(self, code: int, message: str) -> None:
        logger.debug("HTTP/2 connection from {} failed: {}", self.peer_name, message)
        self._goaway(max(self.streams, default=0), code, message.encode()[:200])
        self._close()

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.headers_sid and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._on_data(flags, sid, payload)
        elif kind == HEADERS:
            if sid == 0:
                raise H2Error(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                block = block[5:]
            if flags & END_HEADERS:
                self._on_headers(sid, flags & END_STREAM != 0, self._decode(block))
            else:
                self.headers_sid, self.headers_flags, self.headers_block = sid, flags, bytearray(block)
        elif kind == CONTINUATION:
            if sid != self.headers_sid or sid == 0:
                raise H2Error(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self.headers_block += payload
            if len(self.headers_block) > 1 << 20:
                raise H2Error(PROTOCOL_ERROR, "a header block over 1 MiB")
            if flags & END_HEADERS:
                block, f = bytes(self.headers_block), self.headers_flags
                self.headers_sid, self.headers_block = 0, bytearray()
                self._on_headers(sid, f & END_STREAM != 0, self._decode(block))
        elif kind == SETTINGS:
            if flags & ACK:
                return
            if len(payload) % 6:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
            for i in range(0, len(payload), 6):
                key, value = _SETTING.unpack_from(payload, i)
                if key == S_INITIAL_WINDOW_SIZE:
                    if value > 0x7FFFFFFF:
                        raise H2Error(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                    delta = value - self.peer_initial_window
                    self.peer_initial_window = value
                    for each in self.streams.values():
                        each.window += delta
                elif key == S_HEADER_TABLE_SIZE:
                    self._on_table_size(value)
                elif key == S_MAX_FRAME_SIZE:
                    if not 16384 <= value <= 16777215:
                        raise H2Error(PROTOCOL_ERROR, f"max frame size {value}")
                    self.peer_max_frame = value
            self._write(frame(SETTINGS, ACK, 0))
            self._drain_blocked()
        elif kind == PING:
            if len(payload) != 8:
                raise H2Error(FRAME_SIZE_ERROR, "PING not 8 bytes")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
            inc = U32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.send_window += inc
            else:
                st = self.streams.get(sid)
                if st is None:
                    return
                st.window += inc
            if self.blocked:
                self._drain_blocked()
        elif kind == RST_STREAM:
            st = self.streams.get(sid)
            if st is not None:
                self._on_reset(st, U32.unpack(payload[:4])[0] if len(payload) >= 4 else CANCEL)
        elif kind == GOAWAY:
            self._on_goaway(U32.unpack(payload[:4])[0] & 0x7FFFFFFF if len(payload) >= 4 else 0)
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE though push is disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise H2Error(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self.conn_unacked += len(payload)
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            return  # a stream we already ended: its bytes still count against the connection
        data = self._unpad(flags, payload) if flags & PADDED else payload
        st.unacked += len(payload)
        if st.unacked >= WINDOW // 2 and not flags & END_STREAM:
            self._write(frame(WINDOW_UPDATE, 0, sid, U32.pack(st.unacked)))
            st.unacked = 0
        rbuf = st.rbuf
        if not rbuf and len(data) >= 5:
            # the common case: whole messages in one frame, no copy into the buffer
            compressed, n = MESSAGE_PREFIX.unpack_from(data, 0)
            if len(data) == 5 + n:
                self._message(st, compressed, data[5:])
                data = b""
        if data:
            rbuf += data
            while len(rbuf) >= 5:
                compressed, n = MESSAGE_PREFIX.unpack_from(rbuf, 0)
                if n > MAX_MESSAGE:
                    self._message_too_big(st, n)
                    return
                if len(rbuf) < 5 + n:
                    break
                msg = bytes(rbuf[5 : 5 + n])
                del rbuf[: 5 + n]
                self._message(st, compressed, msg)
                if st.sid not in self.streams:
                    return
        if flags & END_STREAM:
            st.remote_closed = True
            self._on_remote_end(st)

    def _local_done(self, st: Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self.streams.pop(st.sid, None)

    # hooks for the two ends
    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        """A decoded header block on ``sid`` (a new stream's, a response's or trailers)."""
        raise NotImplementedError

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        raise NotImplementedError

    def _message_too_big(self, st: Stream, n: int) -> None:
        raise NotImplementedError

    def _on_remote_end(self, st: Stream) -> None:
        raise NotImplementedError

    def _on_reset(self, st: Stream, code: int) -> None:
        raise NotImplementedError

    def _on_goaway(self, last_sid: int) -> None:
        pass

    def _on_table_size(self, value: int) -> None:
        pass  # our server's encoder uses no dynamic table

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decode a header block; a block seen before, on an unchanged table, from the cache.

        Clients that index their headers send the same few bytes for every call once the
        table holds them: such a block only reads the table, so its fields are those of
        the last time while the table is as it was (its newest entry the same object).
        """
        table = self.decoder.header_table.dynamic_entries
        size = len(table)
        newest = table[0] if table else None
        hit = self._header_cache.get(block)
        if hit is not None and hit[0] == size and hit[1] is newest:
            return hit[2]
        try:
            headers: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)  # type: ignore[assignment]
        except HPACKError as exc:
            raise H2Error(COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        if len(table) == size and (table[0] if table else None) is newest:  # the block only read the table
            if len(self._header_cache) >= 64:
                self._header_cache.clear()
            self._header_cache[block] = (size, newest, headers)
        return headers
