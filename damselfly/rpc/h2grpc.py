"""gRPC over cleartext HTTP/2 on asyncio, without grpcio's core.

grpcio's asyncio server costs about a millisecond of CPU per stream here (its completion
queue hands every message between threads), which caps a scheduler on one core near
1,000 AnnouncePeer streams a second whatever the scheduler does. This module speaks the
same wire protocol (RFC 9113 framing, HPACK, gRPC's length-prefixed messages, status in
trailers) in one event loop:

- :class:`Server` hosts the servicers that grpcio's generated code registers
  (``add_XServicer_to_server(servicer, server)`` works unchanged) for asyncio servicer
  methods of all four kinds, with ``context.abort``, ``invocation_metadata``,
  ``write``/``read``, deadlines (``grpc-timeout``) and cancellation by the client; a
  streaming method marked with :func:`callback_form` is served from callbacks instead,
  with no task per call (the scheduler's AnnouncePeer);
- :class:`Connection` is a small client (one HTTP/2 connection, many streams) that the
  scheduler load test drives, so the load generator is not the bottleneck either.

TLS: :meth:`Server.add_secure_port` serves a port over TLS (ALPN ``h2``) and requires a
client certificate (mutual TLS); ``context.peer_certificate()`` hands servicers its DER.
The record layer is asyncio's, so only TLS connections pay for it.

Bounds: one connection may have ``max_streams`` streams open at once (advertised in
SETTINGS_MAX_CONCURRENT_STREAMS); a stream past it is answered with RST_STREAM
REFUSED_STREAM, which tells the client it was not processed and may be retried.

Not covered: compression (a compressed message is refused with UNIMPLEMENTED), server
push, and HTTP/1.1 upgrade; clients must speak HTTP/2 with prior knowledge, as every
gRPC client does on a cleartext channel.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import grpc
from hpack import Decoder
from hpack.exceptions import HPACKError
from loguru import logger

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

_FRAME = struct.Struct(">BHBBI")  # 24-bit length as 8 + 16 bits, type, flags, stream id
_U32 = struct.Struct(">I")
_MSG = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length
_SETTING = struct.Struct(">HI")

WINDOW = 1 << 24  # what we let a peer send before it hears from us, per stream and per connection
MAX_FRAME = 1 << 20  # the largest frame we accept
MAX_MESSAGE = 16 << 20  # the largest gRPC message we accept
DEFAULT_MAX_FRAME = 16384
DEFAULT_WINDOW = 65535
SEND_HIGH_WATER = 1 << 20  # a handler's writes wait while this much is queued behind flow control
MAX_STREAMS = 1000  # streams one connection may have open at once (security.limits.grpc_max_streams)
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to finish its handshake
CLOSE_WAIT = 0.2  # seconds a stopping server waits for a connection to close (a TLS close_notify) before it aborts it

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class H2Error(Exception):
    """The peer broke HTTP/2; the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, kind, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
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


def _hpack_str(data: bytes) -> bytes:
    return _hpack_int(len(data), 7) + data  # no Huffman coding: the peer's decoder takes both


def encode_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """An HPACK block that touches no dynamic table: each field a literal without indexing,
    so one precomputed block stays valid on every connection."""
    out = bytearray()
    for name, value in headers:
        n = name.encode() if isinstance(name, str) else name
        v = value.encode() if isinstance(value, str) else value
        out += b"\x00" + _hpack_str(n) + _hpack_str(v)
    return bytes(out)


def encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
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
    out = []
    for k, v in headers:
        if k[:1] == b":" or k in skip:
            continue
        key = k.decode("ascii", "replace")
        if key.endswith("-bin"):
            out.append(Metadatum(key, base64.b64decode(v + b"=" * (-len(v) % 4))))
        else:
            out.append(Metadatum(key, v.decode("utf-8", "replace")))
    return tuple(out)


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


def parse_timeout(value: bytes) -> float | None:
    text = value.decode("ascii", "replace")
    if len(text) < 2 or len(text) > 9 or not text[:-1].isdigit() or text[-1] not in _TIMEOUT_UNITS:
        return None
    return int(text[:-1]) * _TIMEOUT_UNITS[text[-1]]


class _Stream:
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
        self.drained: asyncio.Future[None] | None = None


class _H2Protocol(asyncio.Protocol):
    """Framing, settings, PING, flow control and header decoding shared by both ends."""

    is_client = False
    max_streams = 1 << 16  # what we advertise in SETTINGS_MAX_CONCURRENT_STREAMS

    def __init__(self) -> None:
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out = bytearray()
        self._flush_scheduled = False
        self.decoder = Decoder()
        self._header_cache: dict[bytes, tuple[int, object, list[tuple[bytes, bytes]]]] = {}
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self.conn_unacked = 0
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # streams with output waiting for window
        self.headers_sid = 0  # a header block in progress (CONTINUATION follows)
        self.headers_flags = 0
        self.headers_block = bytearray()
        self.preface_seen = self.is_client
        self.closed = False
        self.peer_name = ""
        self.peer_cert: bytes | None = None  # DER of the verified certificate of the peer, over TLS

    # -- output -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(bytes(self.out))
        self.out.clear()

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
        return frame(SETTINGS, 0, 0, payload) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(WINDOW - DEFAULT_WINDOW))

    def _send_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
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

    def _send_message(self, st: _Stream, data: bytes, end_stream: bool = False) -> None:
        """One serialized gRPC message, length-prefixed, as DATA."""
        n = len(data) + 5
        if n <= self.send_window and n <= st.window and n <= self.peer_max_frame and not (st.pending or st.pending_end):
            # the common case, a small message within the windows: one frame, built in place
            self.send_window -= n
            st.window -= n
            out = self.out
            out += _FRAME.pack(n >> 16, n & 0xFFFF, DATA, END_STREAM if end_stream else 0, st.sid)
            out += _MSG.pack(0, n - 5)
            out += data
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
            return
        self._send_data(st, _MSG.pack(0, len(data)) + data, end_stream)

    def _send_data(self, st: _Stream, payload: bytes, end_stream: bool = False) -> None:
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

    def _emit_data(self, st: _Stream, payload: bytes, end_stream: bool) -> None:
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

    # -- input ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_name = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"ipv4:{peer[0]}:{peer[1]}"
        else:
            self.peer_name = str(peer)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:  # called once the handshake is done: the certificate is verified
            self.peer_cert = tls.getpeercert(binary_form=True)
        self._write((PREFACE if self.is_client else b"") + self._settings_frame())

    def data_received(self, data: bytes) -> None:
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
            unpack = _FRAME.unpack_from
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
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.conn_unacked)))
            self.conn_unacked = 0

    def _fail(self, code: int, message: str) -> None:
        logger.debug("HTTP/2 connection from {} failed: {}", self.peer_name, message)
        last = max(self.streams, default=0)
        self._write(frame(GOAWAY, 0, 0, _U32.pack(last) + _U32.pack(code) + message.encode()[:200]))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

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
                self._on_header_block(sid, flags, block)
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
                self._on_header_block(sid, f, block)
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
                    for st in self.streams.values():
                        st.window += delta
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
            inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
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
                self._on_reset(st, _U32.unpack(payload[:4])[0] if len(payload) >= 4 else CANCEL)
        elif kind == GOAWAY:
            self._on_goaway(_U32.unpack(payload[:4])[0] & 0x7FFFFFFF if len(payload) >= 4 else 0)
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
            self._write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(st.unacked)))
            st.unacked = 0
        rbuf = st.rbuf
        if not rbuf and len(data) >= 5:
            # the common case: whole messages in one frame, no copy into the buffer
            compressed, n = _MSG.unpack_from(data, 0)
            if len(data) == 5 + n:
                self._message(st, compressed, data[5:])
                data = b""
        if data:
            rbuf += data
            while len(rbuf) >= 5:
                compressed, n = _MSG.unpack_from(rbuf, 0)
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

    def _local_done(self, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self.streams.pop(st.sid, None)

    # hooks for the two ends
    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        raise NotImplementedError

    def _message(self, st: _Stream, compressed: int, data: bytes) -> None:
        raise NotImplementedError

    def _message_too_big(self, st: _Stream, n: int) -> None:
        raise NotImplementedError

    def _on_remote_end(self, st: _Stream) -> None:
        raise NotImplementedError

    def _on_reset(self, st: _Stream, code: int) -> None:
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
            headers: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise H2Error(COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        if len(table) == size and (table[0] if table else None) is newest:  # the block only read the table
            if len(self._header_cache) >= 64:
                self._header_cache.clear()
            self._header_cache[block] = (size, newest, headers)
        return headers


# -- the server ------------------------------------------------------------------------------

RESPONSE_HEADERS = b"\x88" + encode_headers([("content-type", "application/grpc")])  # 0x88: :status 200
_OK_TRAILERS = encode_headers([("grpc-status", "0")])
_SKIP_METADATA = frozenset({b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"})


def status_block(code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]] = ()) -> bytes:
    if code is grpc.StatusCode.OK and not details and not trailing:
        return _OK_TRAILERS
    fields: list[tuple[bytes, bytes]] = [(b"grpc-status", str(code.value[0]).encode())]
    if details:
        fields.append((b"grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()))
    fields += encode_metadata(trailing)
    return encode_headers(fields)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def callback_form(form: Callable[[Any, _Requests, ServicerContext], None]) -> Callable[[Any], Any]:
    """Give a bidirectional-streaming servicer method a second form, for this server only:
    ``form(servicer, requests, context)``, called when the call's headers arrive, with no
    task for the call. It hands the requests to callbacks (``requests.listen``), answers with
    ``context.write_nowait`` and ends the call with ``context.end``; a call cut short (the
    client's cancel, a deadline, the connection lost, the server stopping) runs the
    context's done callbacks. grpcio, and this server for an unmarked method, run the
    method itself."""

    def mark(method: Any) -> Any:
        method.h2grpc_callback_form = form
        return method

    return mark


class _Requests:
    """The request messages of one stream, as the handler's async iterator; or, once the
    handler calls :meth:`listen`, handed to its callbacks as they arrive."""

    __slots__ = ("deserialize", "ended", "error", "fail", "items", "on_end", "on_message", "waiter")

    def __init__(self, deserialize: Callable[[bytes], Any] | None):
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.error: BaseException | None = None
        self.deserialize = deserialize
        self.on_message: Callable[[Any], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self.fail: Callable[[str], None] | None = None  # ends the call with INTERNAL

    def listen(self, on_message: Callable[[Any], None], on_end: Callable[[], None]) -> None:
        """Hand each request to ``on_message`` as it arrives (in the connection's read, with
        no task switch per message), and the end of the requests to ``on_end``; for handlers
        that react to every message at once. The callbacks must not raise."""
        self.on_message, self.on_end = on_message, on_end
        while self.items and self.on_message is not None:
            self._hand(self.items.popleft())
        if self.ended:
            self.on_message = self.on_end = None  # nothing more comes (and no cycle is kept)
            if self.error is None:
                on_end()

    def _hand(self, raw: Any) -> None:
        assert self.on_message is not None
        try:
            item = raw if self.deserialize is None else self.deserialize(raw)
        except Exception as exc:
            self.on_message = None
            if self.fail is not None:
                self.fail(f"cannot parse the request: {exc}")
            return
        self.on_message(item)

    def push(self, item: Any) -> None:
        if self.on_message is not None:
            self._hand(item)
            return
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def end(self, error: BaseException | None = None) -> None:
        self.ended = True
        self.error = self.error or error
        on_end = self.on_end
        # nothing more comes: the callbacks go, and with them the cycles they close (a
        # listener holds its stream, which holds these requests)
        self.on_message = self.on_end = None
        if on_end is not None and error is None:
            on_end()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        while not self.items:
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        raw = self.items.popleft()
        if self.deserialize is None:
            return raw
        try:
            return self.deserialize(raw)
        except Exception as exc:
            raise _Abort(grpc.StatusCode.INTERNAL, f"cannot parse the request: {exc}") from exc


class ServicerContext:
    """The subset of ``grpc.aio.ServicerContext`` that servicers use."""

    def __init__(self, stream: _ServerStream, metadata: tuple[Metadatum, ...], deadline: float | None):
        self._stream = stream
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._callbacks: list[Callable[[ServicerContext], None]] = []

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def peer(self) -> str:
        return self._stream.conn.peer_name

    def peer_certificate(self) -> bytes | None:
        """The DER of the client's certificate, verified against the server's CA on a TLS
        port (:meth:`Server.add_secure_port`); None on a cleartext one. Not in grpcio's API
        (grpcio has ``auth_context``); ``damselfly.security.identity.identity_of`` reads both."""
        return self._stream.conn.peer_cert

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cancelled(self) -> bool:
        return self._stream.cancelled

    def done(self) -> bool:
        return self._stream.local_closed or self._stream.cancelled

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Iterable[tuple[str, str | bytes]] = ()
    ) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("abort with OK")
        self._trailing = tuple(trailing_metadata) or self._trailing
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self._stream.send_headers(encode_headers(encode_metadata(metadata)))

    async def write(self, message: Any) -> None:
        await self._stream.send_message(message)

    def end(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        """End a call served in its callback form (:func:`callback_form`) with ``code``."""
        st = self._stream
        server = st.conn.server
        if st in server._callback_streams:
            st.finish(code, details, self._trailing)
            server._callback_over(st)

    def _run_done_callbacks(self) -> None:
        for cb in self._callbacks:
            try:
                cb(self)
            except Exception as exc:  # pragma: no cover - a callback's own bug
                logger.warning("a done callback failed: {}", exc)

    def write_nowait(self, message: Any) -> bool:
        """Send ``message`` now, past flow control's high-water mark (it queues behind the
        windows): for a handler answering from callbacks (``listen``), whose answers are few.
        False when the stream is over already. Not in grpcio's API."""
        st = self._stream
        if st.local_closed or st.cancelled:
            return False
        serialize = st.handler.response_serializer
        st.send_headers()
        st.conn._send_message(st, serialize(message) if serialize is not None else message)
        return True

    def write_encoded_nowait(self, data: bytes) -> bool:
        """:meth:`write_nowait` for a message serialized already (``data``, its encoding).
        Not in grpcio's API."""
        st = self._stream
        if st.local_closed or st.cancelled:
            return False
        st.send_headers()
        st.conn._send_message(st, data)
        return True

    async def read(self) -> Any:
        try:
            return await self._stream.requests.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def add_done_callback(self, callback: Callable[[ServicerContext], None]) -> None:
        self._callbacks.append(callback)


class _ServerStream(_Stream):
    __slots__ = ("cancelled", "conn", "context", "handler", "headers_sent", "requests", "task", "timer")

    def __init__(self, sid: int, window: int, conn: _ServerProtocol, handler: grpc.RpcMethodHandler):
        super().__init__(sid, window)
        self.conn = conn
        self.handler = handler
        self.requests = _Requests(handler.request_deserializer)
        self.requests.fail = self._fail
        self.context: ServicerContext | None = None
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.cancelled = False
        self.timer: asyncio.TimerHandle | None = None

    def _fail(self, details: str) -> None:
        self.conn._abort_stream(self, grpc.StatusCode.INTERNAL, details)

    def release(self) -> None:
        """The call is over: drop the references that tie its stream, context, task, requests
        and the handler's callbacks into cycles, so its objects are freed at once instead of
        by the garbage collector, whose pauses fall on the calls still running."""
        ctx = self.context
        if ctx is not None:
            ctx._callbacks = []
            self.context = None
        self.task = None
        r = self.requests
        r.on_message = r.on_end = r.fail = None

    def send_headers(self, extra: bytes = b"") -> None:
        if not self.headers_sent:
            self.headers_sent = True
            self.conn._send_headers(self.sid, RESPONSE_HEADERS + extra, False)

    async def send_message(self, message: Any) -> None:
        if self.local_closed or self.cancelled:
            raise _Abort(grpc.StatusCode.CANCELLED, "the stream is over")
        serialize = self.handler.response_serializer
        data = serialize(message) if serialize is not None else message
        self.send_headers()
        self.conn._send_message(self, data)
        if len(self.pending) > SEND_HIGH_WATER:
            self.drained = self.conn.loop.create_future()
            await self.drained

    def finish(self, code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]] = ()) -> None:
        if self.local_closed or self.cancelled or self.trailers is not None:
            return  # over already, or its status waits behind flow control
        conn = self.conn
        if self.timer is not None:
            self.timer.cancel()
        block = status_block(code, details, trailing)
        if not self.headers_sent:
            self.headers_sent = True
            block = RESPONSE_HEADERS + block  # trailers-only
        if self.pending or self.pending_end:
            self.trailers = block
            return
        conn._send_headers(self.sid, block, True)
        conn._local_done(self)
        if not self.remote_closed:
            # the answer is complete; the client need not send the rest (RFC 9113 8.1)
            conn._write(frame(RST_STREAM, 0, self.sid, _U32.pack(NO_ERROR)))
            conn.streams.pop(self.sid, None)
            conn.blocked.pop(self.sid, None)


class _ServerProtocol(_H2Protocol):
    def __init__(self, server: Server, peer_check: Callable[[bytes, str], bool] | None = None):
        super().__init__()
        self.server = server
        self.peer_check = peer_check
        self.refused: str | None = None  # why every call of this connection is refused
        self.lost: asyncio.Future[None] | None = None  # set by a stopping server, done when the connection is
        self.max_streams = server.max_streams
        self.last_sid = 0
        self._parsed: dict[int, tuple[Any, ...]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._connections.add(self)
        if self.peer_check is not None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            if not self.peer_check(self.peer_cert or b"", ip):
                # every call on it is refused with PERMISSION_DENIED: the client hears why
                self.refused = f"the client certificate does not name {ip}, the address it connects from"
                logger.warning("SECURITY: refusing the calls of a TLS connection from {}: {}", ip, self.refused)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        for st in list(self.streams.values()):
            self._on_reset(st, CANCEL)  # type: ignore[arg-type]
        self.streams.clear()

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client end its half
            if flags & END_STREAM:
                st.remote_closed = True
                self._on_remote_end(st)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            if sid <= self.last_sid:
                return  # a stream we reset; its late headers still had to pass the decoder
            raise H2Error(PROTOCOL_ERROR, f"a client stream with even id {sid}")
        self.last_sid = sid
        if self.server._stopping or len(self.streams) >= self.max_streams:
            # not processed: the client may retry it (RFC 9113 8.7), on another connection if it must
            self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        parsed = self._parsed.get(id(headers))
        if parsed is None or parsed[0] is not headers:
            # the same header list (from the decoder's cache) means the same call: parse it once
            parsed = (headers, *self._parse_request(headers))
            if len(self._parsed) >= 64:
                self._parsed.clear()
            self._parsed[id(headers)] = parsed
        _, is_grpc, handler, timeout, metadata = parsed
        if not is_grpc:
            self._send_headers(sid, b"\x00" + _hpack_str(b":status") + _hpack_str(b"415"), True)
            return
        if self.refused is not None:
            self._trailers_only(sid, grpc.StatusCode.PERMISSION_DENIED, self.refused)
            return
        if handler is None:
            self._trailers_only(sid, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        st = _ServerStream(sid, self.peer_initial_window, self, handler)
        self.streams[sid] = st
        deadline = None
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                deadline = time.monotonic() + seconds
                st.timer = self.loop.call_later(seconds, self._deadline, st)
        st.context = ServicerContext(st, metadata, deadline)
        fn = handler.stream_stream
        form = getattr(fn, "h2grpc_callback_form", None) if fn is not None else None
        if form is not None:
            self.server._start_callbacks(st, form, getattr(fn, "__self__", None))
        else:
            st.task = self.loop.create_task(self.server._run(st))
        if flags & END_STREAM:
            st.remote_closed = True
            self._on_remote_end(st)

    def _parse_request(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bool, grpc.RpcMethodHandler | None, bytes | None, tuple[Metadatum, ...]]:
        """(a gRPC request at all, its handler, grpc-timeout, metadata) for a request's headers."""
        path = method = content_type = b""
        timeout = None
        for k, v in headers:
            if k == b":path":
                path = v
            elif k == b":method":
                method = v
            elif k == b"content-type":
                content_type = v
            elif k == b"grpc-timeout":
                timeout = v
        metadata = decode_metadata(headers, _SKIP_METADATA)
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            return False, None, None, metadata
        return True, self.server._lookup(path.decode("utf-8", "replace"), metadata), timeout, metadata

    def _trailers_only(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self._send_headers(sid, RESPONSE_HEADERS + status_block(code, details), True)

    def _message(self, st: _Stream, compressed: int, data: bytes) -> None:
        assert isinstance(st, _ServerStream)
        if compressed:
            self._abort_stream(st, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            return
        r = st.requests
        if r.on_message is not None:
            r._hand(data)  # push's first case, one call fewer for every request a listener reads
        else:
            r.push(data)

    def _message_too_big(self, st: _Stream, n: int) -> None:
        assert isinstance(st, _ServerStream)
        self._abort_stream(st, grpc.StatusCode.RESOURCE_EXHAUSTED, f"a message of {n} bytes is over {MAX_MESSAGE}")

    def _abort_stream(self, st: _ServerStream, code: grpc.StatusCode, details: str) -> None:
        st.finish(code, details)
        st.cancelled = True
        if st.task is not None:
            st.task.cancel()
        self.server._callback_over(st)

    def _on_remote_end(self, st: _Stream) -> None:
        assert isinstance(st, _ServerStream)
        st.requests.end()
        if st.local_closed:
            self.streams.pop(st.sid, None)

    def _on_reset(self, st: _Stream, code: int) -> None:
        assert isinstance(st, _ServerStream)
        st.cancelled = True
        if st.timer is not None:
            st.timer.cancel()
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)
        st.requests.end(asyncio.CancelledError())
        if st.task is not None and not st.task.done():
            st.task.cancel()
        self.server._callback_over(st)

    def _deadline(self, st: _ServerStream) -> None:
        st.timer = None
        self._abort_stream(st, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class Server:
    """A gRPC server in the shape of ``grpc.aio.Server`` for the parts damselfly uses.

    ``max_streams`` bounds the streams one connection may have open at once (a client
    past it gets REFUSED_STREAM); ``add_secure_port`` serves mutual TLS.
    """

    takes_ssl_context = True  # add_secure_port takes an ssl.SSLContext, not grpc.ServerCredentials

    def __init__(self, *, max_streams: int = MAX_STREAMS) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self.max_streams = max_streams
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None, Callable[[bytes, str], bool] | None]] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[_ServerProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._callback_streams: set[_ServerStream] = set()  # calls in their callback form, until over
        self._callbacks_done: asyncio.Future[None] | None = None  # stop() waits on it
        self._stopping = False
        self._stopped: asyncio.Event | None = None

    # what grpcio's generated add_*_to_server calls
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._registered[f"/{service}/{name}"] = handler

    def _lookup(self, path: str, metadata: tuple[Metadatum, ...]) -> grpc.RpcMethodHandler | None:
        handler = self._registered.get(path)
        if handler is not None:
            return handler
        details = _CallDetails(path, metadata)
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def add_insecure_port(self, address: str) -> int:
        """Bind now (as grpcio does), listen from :meth:`start`; returns the port, 0 on failure."""
        return self._bind(address, None)

    def add_secure_port(
        self,
        address: str,
        ssl_context: ssl.SSLContext,
        *,
        peer_check: Callable[[bytes, str], bool] | None = None,
    ) -> int:
        """Like :meth:`add_insecure_port`, over TLS with ``ssl_context`` (a server context that
        requires a client certificate: mutual TLS or nothing); ALPN ``h2`` is offered.
        ``peer_check(der, ip)``, when given, must accept the client's certificate and the IP
        address it connects from, or every call on the connection ends in PERMISSION_DENIED.
        Returns the port, 0 on failure."""
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("h2grpc serves TLS only with client certificates required (ssl.CERT_REQUIRED)")
        try:
            ssl_context.set_alpn_protocols(["h2"])
        except NotImplementedError:  # pragma: no cover - every OpenSSL this runs on has ALPN
            pass
        return self._bind(address, ssl_context, peer_check)

    def _bind(
        self,
        address: str,
        ssl_context: ssl.SSLContext | None,
        peer_check: Callable[[bytes, str], bool] | None = None,
    ) -> int:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
        except (OSError, ValueError):
            sock.close()
            return 0
        sock.listen(1024)
        sock.setblocking(False)
        self._sockets.append((sock, ssl_context, peer_check))
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sock, ctx, check in self._sockets:
            timeout = TLS_HANDSHAKE_TIMEOUT if ctx is not None else None
            server = await loop.create_server(
                functools.partial(_ServerProtocol, self, check), sock=sock, ssl=ctx, ssl_handshake_timeout=timeout
            )
            self._servers.append(server)

    async def stop(self, grace: float | None) -> None:
        """Refuse new streams, let running ones end within ``grace`` seconds, then cancel them."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn._write(frame(GOAWAY, 0, 0, _U32.pack(conn.last_sid) + _U32.pack(NO_ERROR)))
        running: list[asyncio.Future[Any]] = [t for t in self._tasks if not t.done()]
        if self._callback_streams:
            self._callbacks_done = asyncio.get_running_loop().create_future()
            running.append(self._callbacks_done)
        if running and grace:
            await asyncio.wait(running, timeout=grace)
        for t in self._tasks:
            t.cancel()
        for st in list(self._callback_streams):
            st.finish(grpc.StatusCode.CANCELLED, "the server is stopping")
            self._callback_over(st)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_connections()
        for srv in self._servers:
            await srv.wait_closed()
        if self._stopped is not None:
            self._stopped.set()

    async def _close_connections(self) -> None:
        """Close every connection and wait until each is gone; one still open after
        ``CLOSE_WAIT`` (a TLS peer that never answers our close_notify) is aborted."""
        loop = asyncio.get_running_loop()
        waiting: dict[_ServerProtocol, asyncio.Future[None]] = {}
        for conn in list(self._connections):
            conn._flush()
            if conn.transport is not None:
                conn.lost = waiting[conn] = loop.create_future()
                conn.transport.close()
        if not waiting:
            return
        _, pending = await asyncio.wait(waiting.values(), timeout=CLOSE_WAIT)
        if pending:
            for conn, lost in waiting.items():
                if not lost.done() and conn.transport is not None:
                    conn.transport.abort()
            await asyncio.wait(pending, timeout=CLOSE_WAIT)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        assert self._stopped is not None, "start the server first"
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _start_callbacks(self, st: _ServerStream, form: Callable[..., None], servicer: Any) -> None:
        self._callback_streams.add(st)
        ctx = st.context
        assert ctx is not None
        try:
            form(servicer, st.requests, ctx)
        except Exception as exc:
            logger.opt(exception=exc).debug("a call on {} failed", st.conn.peer_name)
            ctx.end(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _callback_over(self, st: _ServerStream) -> None:
        """A call in its callback form ended, one way or another: its done callbacks, once
        (nothing for a call that is not, or no longer, in that form)."""
        if st not in self._callback_streams:
            return
        self._callback_streams.discard(st)
        if st.timer is not None:
            st.timer.cancel()
        ctx = st.context
        assert ctx is not None
        ctx._run_done_callbacks()
        st.release()
        w = self._callbacks_done
        if not self._callback_streams and w is not None and not w.done():
            w.set_result(None)

    async def _run(self, st: _ServerStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        assert st.context is not None
        self._tasks.add(task)
        ctx = st.context
        h = st.handler
        try:
            request: Any = st.requests
            if not h.request_streaming:
                try:
                    request = await st.requests.__anext__()
                except StopAsyncIteration:
                    raise _Abort(grpc.StatusCode.INTERNAL, "the request carried no message") from None
            fn = h.stream_stream or h.unary_stream or h.stream_unary or h.unary_unary
            result = fn(request, ctx)
            if h.response_streaming:
                if inspect.isasyncgen(result):
                    try:
                        async for message in result:
                            await st.send_message(message)
                    finally:
                        await result.aclose()
                elif inspect.isawaitable(result):
                    await result  # the handler wrote through context.write
                else:
                    for message in result:
                        await st.send_message(message)
            else:
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    await st.send_message(result)
                elif ctx._code in (None, grpc.StatusCode.OK):
                    raise _Abort(grpc.StatusCode.INTERNAL, "the handler returned no response")
            st.finish(ctx._code or grpc.StatusCode.OK, ctx._details, ctx._trailing)
        except _Abort as exc:
            st.finish(exc.code, exc.details, ctx._trailing)
        except asyncio.CancelledError:
            if not st.cancelled:
                st.finish(grpc.StatusCode.CANCELLED, "the server is stopping")
        except Exception as exc:
            if ctx._code not in (None, grpc.StatusCode.OK):
                st.finish(ctx._code, ctx._details, ctx._trailing)  # set_code, then raise: as grpcio does
            else:
                logger.opt(exception=exc).debug("a call on {} failed", st.conn.peer_name)
                st.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        finally:
            self._tasks.discard(task)
            ctx._run_done_callbacks()
            st.release()


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[Metadatum, ...]


# -- the client ------------------------------------------------------------------------------


class RpcError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: int, details: str):
        super().__init__(f"status {code}: {details}")
        self.code = code
        self.details = details


class ClientStream(_Stream):
    __slots__ = ("conn", "details", "messages", "status")

    def __init__(self, sid: int, window: int, conn: Connection):
        super().__init__(sid, window)
        self.conn = conn
        self.messages = _Requests(None)
        self.status: int | None = None
        self.details = ""

    def send(self, message: bytes, end: bool = False) -> None:
        """Queue one serialized message (and, with ``end``, half-close)."""
        self.conn._send_message(self, message, end)
        if end:
            self.local_closed = True

    def end(self) -> None:
        if not self.local_closed:
            self.conn._send_data(self, b"", True)
            self.local_closed = True

    async def recv(self) -> bytes | None:
        """The next response message, or None once the call ended with OK."""
        try:
            return await self.messages.__anext__()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            if self.status:
                raise RpcError(self.status, self.details) from None
            return None

    def cancel(self) -> None:
        if self.sid in self.conn.streams:
            self.conn._write(frame(RST_STREAM, 0, self.sid, _U32.pack(CANCEL)))
            self.conn.streams.pop(self.sid, None)
            self.conn.blocked.pop(self.sid, None)
            self.messages.end(RpcError(1, "cancelled"))


class Connection(_H2Protocol):
    """One HTTP/2 connection to a gRPC server; ``stream()`` opens calls on it."""

    is_client = True

    def __init__(self, authority: str, secure: bool = False):
        super().__init__()
        self.authority = authority
        self.secure = secure
        self.next_sid = 1
        self._blocks: dict[tuple[str, tuple[tuple[str, str | bytes], ...]], bytes] = {}
        # our encoder's dynamic table: fields are added while they fit and never evicted, so an
        # entry's index is fixed by how many were added after it
        self._indexed: dict[tuple[bytes, bytes], int] = {}
        self._inserted = 0
        self._table_size = 0
        self._table_limit = 4096  # the peer's SETTINGS_HEADER_TABLE_SIZE
        self._table_reset = False

    def _field(self, name: bytes, value: bytes) -> bytes:
        n = self._indexed.get((name, value))
        if n is not None:
            return _hpack_int(62 + self._inserted - 1 - n, 7, 0x80)  # indexed field
        size = len(name) + len(value) + 32
        if self._table_size + size > self._table_limit:
            return b"\x00" + _hpack_str(name) + _hpack_str(value)  # literal, not indexed
        self._indexed[(name, value)] = self._inserted
        self._inserted += 1
        self._table_size += size
        return b"\x40" + _hpack_str(name) + _hpack_str(value)  # literal, added to the table

    def _on_table_size(self, value: int) -> None:
        if value < self._table_limit:
            # forget every entry: the next block starts with a table size update to the new limit
            self._indexed.clear()
            self._blocks.clear()
            self._inserted = self._table_size = 0
            self._table_reset = True
        self._table_limit = min(value, 4096)

    @classmethod
    async def open(cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> Connection:
        """Connect to ``host:port``; over TLS with ``ssl_context`` (a client context: the server's
        certificate must name ``host``), with ALPN ``h2``."""
        loop = asyncio.get_running_loop()
        if ssl_context is None:
            _, proto = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
            return proto
        ssl_context.set_alpn_protocols(["h2"])
        _, proto = await loop.create_connection(
            lambda: cls(f"{host}:{port}", secure=True),
            host,
            port,
            ssl=ssl_context,
            server_hostname=host,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        return proto

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for st in list(self.streams.values()):
            assert isinstance(st, ClientStream)
            st.messages.end(RpcError(14, f"connection lost: {exc}"))
        self.streams.clear()

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def stream(
        self, path: str, metadata: tuple[tuple[str, str | bytes], ...] = (), timeout: float | None = None
    ) -> ClientStream:
        if self.closed:
            raise RpcError(14, "the connection is closed")
        key = (path, metadata)
        block = self._blocks.get(key)
        if block is None:
            before = self._inserted
            block = (b"\x83\x87" if self.secure else b"\x83\x86") + b"".join(  # :method POST, :scheme https/http
                self._field(name, value)
                for name, value in (
                    (b":path", path.encode()),
                    (b":authority", self.authority.encode()),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    (b"user-agent", b"damselfly-h2grpc"),
                    *encode_metadata(metadata),
                )
            )
            if self._inserted == before and len(self._blocks) < 256:
                self._blocks[key] = block  # only indices now: the same bytes every time
        if self._table_reset:
            self._table_reset = False
            block = _hpack_int(self._table_limit, 5, 0x20) + block  # dynamic table size update
        if timeout is not None:
            block += encode_headers([(b"grpc-timeout", f"{max(1, int(timeout * 1000))}m".encode())])
        sid = self.next_sid
        self.next_sid += 2
        st = ClientStream(sid, self.peer_initial_window, self)
        self.streams[sid] = st
        self._send_headers(sid, block, False)
        return st

    async def unary(self, path: str, request: bytes, timeout: float | None = None) -> bytes:
        st = self.stream(path, timeout=timeout)
        st.send(request, end=True)
        reply = await st.recv()
        if reply is None:
            raise RpcError(13, "no response message")
        while await st.recv() is not None:
            pass
        return reply

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        st = self.streams.get(sid)
        if not isinstance(st, ClientStream):
            return
        status = None
        for k, v in headers:
            if k == b"grpc-status":
                status = int(v) if v.isdigit() else 2
            elif k == b"grpc-message":
                st.details = unquote(v.decode("utf-8", "replace"))
            elif k == b":status" and v != b"200":
                status, st.details = 2, f"HTTP status {v.decode()}"
        if status is not None:
            st.status = status
        if flags & END_STREAM:
            st.remote_closed = True
            self._on_remote_end(st)

    def _message(self, st: _Stream, compressed: int, data: bytes) -> None:
        assert isinstance(st, ClientStream)
        st.messages.push(data)

    def _message_too_big(self, st: _Stream, n: int) -> None:
        assert isinstance(st, ClientStream)
        st.status, st.details = 8, f"a message of {n} bytes"
        st.cancel()

    def _on_remote_end(self, st: _Stream) -> None:
        assert isinstance(st, ClientStream)
        if st.status is None:
            st.status, st.details = 2, "the stream ended without grpc-status"
        st.messages.end()
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)

    def _on_reset(self, st: _Stream, code: int) -> None:
        assert isinstance(st, ClientStream)
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)
        if st.remote_closed:
            return
        if code == NO_ERROR and st.status is not None:
            st.messages.end()
            return
        st.status, st.details = st.status or 1, f"the server reset the stream (code {code})"
        st.messages.end()

    def _on_goaway(self, last_sid: int) -> None:
        for sid, st in list(self.streams.items()):
            if sid > last_sid:  # the server will not process these
                assert isinstance(st, ClientStream)
                st.status, st.details = 14, "the server went away"
                self.streams.pop(sid, None)
                self.blocked.pop(sid, None)
                st.messages.end()


async def aiter_messages(st: ClientStream) -> AsyncIterator[bytes]:
    while (m := await st.recv()) is not None:
        yield m
