"""gRPC over HTTP/2 on asyncio, without grpcio's core: the client.

:class:`Connection` is one HTTP/2 connection (many streams) to a gRPC server, this
package's or grpcio's; :meth:`Connection.stream` opens a call, whose :class:`ClientStream`
sends serialized messages and reads the answers. The scheduler load test
(``benchmarks/scheduler_load.py``) drives it, so the load generator is not the bottleneck.
It indexes its request headers in HPACK's dynamic table, so a call's header block is a
few bytes of indices once the table holds them; over TLS it offers ALPN ``h2``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import unquote

from damselfly.rpc.endpoint import TLS_HANDSHAKE_TIMEOUT, Endpoint, RequestStream
from damselfly.rpc.framing import CANCEL, NO_ERROR, Stream, encode_headers, encode_metadata, hpack_int, hpack_str


class RpcError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: int, details: str):
        super().__init__(f"status {code}: {details}")
        self.code = code
        self.details = details


class ClientStream(Stream):
    """One call from the client: :meth:`send` requests, :meth:`recv` answers, then the status."""

    __slots__ = ("conn", "details", "messages", "status")

    def __init__(self, sid: int, window: int, conn: Connection):
        super().__init__(sid, window)
        self.conn = conn
        self.messages = RequestStream(None)
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
            self.conn._reset(self.sid, CANCEL)
            self.messages.end(RpcError(1, "cancelled"))


class Connection(Endpoint):
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
            return hpack_int(62 + self._inserted - 1 - n, 7, 0x80)  # indexed field
        size = len(name) + len(value) + 32
        if self._table_size + size > self._table_limit:
            return b"\x00" + hpack_str(name) + hpack_str(value)  # literal, not indexed
        self._indexed[(name, value)] = self._inserted
        self._inserted += 1
        self._table_size += size
        return b"\x40" + hpack_str(name) + hpack_str(value)  # literal, added to the table

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
            block = hpack_int(self._table_limit, 5, 0x20) + block  # dynamic table size update
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

    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
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
        if end_stream:
            st.remote_closed = True
            self._on_remote_end(st)

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        assert isinstance(st, ClientStream)
        st.messages.push(data)

    def _message_too_big(self, st: Stream, n: int) -> None:
        assert isinstance(st, ClientStream)
        st.status, st.details = 8, f"a message of {n} bytes"
        st.cancel()

    def _on_remote_end(self, st: Stream) -> None:
        assert isinstance(st, ClientStream)
        if st.status is None:
            st.status, st.details = 2, "the stream ended without grpc-status"
        st.messages.end()
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)

    def _on_reset(self, st: Stream, code: int) -> None:
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
    """The answers of ``st`` until the call ends (:class:`RpcError` unless with OK)."""
    while (m := await st.recv()) is not None:
        yield m
