"""gRPC over cleartext HTTP/2 on asyncio, without grpcio's core: the server.

grpcio's asyncio server costs about a millisecond of CPU per stream here (its completion
queue hands every message between threads), which caps a scheduler on one core near
1,000 AnnouncePeer streams a second whatever the scheduler does. This server speaks the
same wire protocol (RFC 9113 framing, HPACK, gRPC's length-prefixed messages, status in
trailers; :mod:`damselfly.rpc.framing`) in one event loop.

:class:`Server` hosts the servicers that grpcio's generated code registers
(``add_XServicer_to_server(servicer, server)`` works unchanged) for asyncio servicer
methods of all four kinds, with ``context.abort``, ``invocation_metadata``,
``write``/``read``, deadlines (``grpc-timeout``) and cancellation by the client; a
streaming method marked with :func:`callback_form` is served from callbacks instead,
with no task per call (the scheduler's AnnouncePeer). Each connection is a
:class:`ServerConnection` (its streams :class:`ServerStream`, each call's
:class:`ServicerContext`).

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
import functools
import inspect
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import quote

import grpc
from loguru import logger

from damselfly.rpc.endpoint import TLS_HANDSHAKE_TIMEOUT, Abort, Endpoint, RequestStream
from damselfly.rpc.framing import (
    CANCEL,
    MAX_MESSAGE,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Error,
    Metadatum,
    Stream,
    decode_metadata,
    encode_headers,
    encode_metadata,
    hpack_str,
    parse_timeout,
)

SEND_HIGH_WATER = 1 << 20  # a handler's writes wait while this much is queued behind flow control
MAX_STREAMS = 1000  # streams one connection may have open at once (security.limits.grpc_max_streams)
CLOSE_WAIT = 0.2  # seconds a stopping server waits for a connection to close (a TLS close_notify) before it aborts it

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


def callback_form(form: Callable[[Any, RequestStream, ServicerContext], None]) -> Callable[[Any], Any]:
    """Give a bidirectional-streaming servicer method a second form, for this server only:
    ``form(servicer, requests, context)``, called when the call's headers arrive, with no
    task for the call. It hands the requests to callbacks (``requests.listen``), answers with
    ``context.write_nowait`` and ends the call with ``context.end``; a call cut short (the
    client's cancel, a deadline, the connection lost, the server stopping) runs the
    context's done callbacks. grpcio, and this server for an unmarked method, run the
    method itself."""

    def mark(method: Any) -> Any:
        method.rpc_callback_form = form
        return method

    return mark


class ServicerContext:
    """The subset of ``grpc.aio.ServicerContext`` that servicers use."""

    def __init__(self, stream: ServerStream, metadata: tuple[Metadatum, ...], deadline: float | None):
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
        raise Abort(code, details)

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


class ServerStream(Stream):
    """One call on the server: its handler, requests, context, and the task or callbacks serving it."""

    __slots__ = ("cancelled", "conn", "context", "handler", "headers_sent", "requests", "task", "timer")

    def __init__(self, sid: int, window: int, conn: ServerConnection, handler: grpc.RpcMethodHandler):
        super().__init__(sid, window)
        self.conn = conn
        self.handler = handler
        self.requests = RequestStream(handler.request_deserializer)
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
            raise Abort(grpc.StatusCode.CANCELLED, "the stream is over")
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
            conn._reset(self.sid, NO_ERROR)


class ServerConnection(Endpoint):
    """One client's connection: its streams become calls of the server's handlers."""

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
            self._on_reset(st, CANCEL)
        self.streams.clear()

    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client end its half
            if end_stream:
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
            self._reset(sid, REFUSED_STREAM)
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
            self._send_headers(sid, b"\x00" + hpack_str(b":status") + hpack_str(b"415"), True)
            return
        if self.refused is not None:
            self._trailers_only(sid, grpc.StatusCode.PERMISSION_DENIED, self.refused)
            return
        if handler is None:
            self._trailers_only(sid, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        st = ServerStream(sid, self.peer_initial_window, self, handler)
        self.streams[sid] = st
        deadline = None
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                deadline = time.monotonic() + seconds
                st.timer = self.loop.call_later(seconds, self._deadline, st)
        st.context = ServicerContext(st, metadata, deadline)
        fn = handler.stream_stream
        form = getattr(fn, "rpc_callback_form", None) if fn is not None else None
        if form is not None:
            self.server._start_callbacks(st, form, getattr(fn, "__self__", None))
        else:
            st.task = self.loop.create_task(self.server._run(st))
        if end_stream:
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

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        assert isinstance(st, ServerStream)
        if compressed:
            self._abort_stream(st, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            return
        r = st.requests
        if r.on_message is not None:
            r.deliver(data)  # push's first case, one call fewer for every request a listener reads
        else:
            r.push(data)

    def _message_too_big(self, st: Stream, n: int) -> None:
        assert isinstance(st, ServerStream)
        self._abort_stream(st, grpc.StatusCode.RESOURCE_EXHAUSTED, f"a message of {n} bytes is over {MAX_MESSAGE}")

    def _abort_stream(self, st: ServerStream, code: grpc.StatusCode, details: str) -> None:
        st.finish(code, details)
        st.cancelled = True
        if st.task is not None:
            st.task.cancel()
        self.server._callback_over(st)

    def _on_remote_end(self, st: Stream) -> None:
        assert isinstance(st, ServerStream)
        st.requests.end()
        if st.local_closed:
            self.streams.pop(st.sid, None)

    def _on_reset(self, st: Stream, code: int) -> None:
        assert isinstance(st, ServerStream)
        st.cancelled = True
        if st.timer is not None:
            st.timer.cancel()
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)
        st.requests.end(asyncio.CancelledError())
        if st.task is not None and not st.task.done():
            st.task.cancel()
        self.server._callback_over(st)

    def _deadline(self, st: ServerStream) -> None:
        st.timer = None
        self._abort_stream(st, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class Server:
    """A gRPC server in the shape of ``grpc.aio.Server`` for the parts damselfly uses.

    ``max_streams`` bounds the streams one connection may have open at once (a client
    past it gets REFUSED_STREAM); ``add_secure_port`` serves mutual TLS.
    """

    takes_ssl_context = True  # add_secure_port takes an ssl.SSLContext, not grpc.ServerCredentials
    # what each accepted connection is: benchmarks/rpc_framing.py swaps in another framing under it
    connection_class: type[ServerConnection] = ServerConnection

    def __init__(self, *, max_streams: int = MAX_STREAMS) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self.max_streams = max_streams
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None, Callable[[bytes, str], bool] | None]] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._callback_streams: set[ServerStream] = set()  # calls in their callback form, until over
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
            raise ValueError("this server serves TLS only with client certificates required (ssl.CERT_REQUIRED)")
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
                functools.partial(self.connection_class, self, check), sock=sock, ssl=ctx, ssl_handshake_timeout=timeout
            )
            self._servers.append(server)

    async def stop(self, grace: float | None) -> None:
        """Refuse new streams, let running ones end within ``grace`` seconds, then cancel them."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn._goaway(conn.last_sid)
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
        waiting: dict[ServerConnection, asyncio.Future[None]] = {}
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

    def _start_callbacks(self, st: ServerStream, form: Callable[..., None], servicer: Any) -> None:
        self._callback_streams.add(st)
        ctx = st.context
        assert ctx is not None
        try:
            form(servicer, st.requests, ctx)
        except Exception as exc:
            logger.opt(exception=exc).debug("a call on {} failed", st.conn.peer_name)
            ctx.end(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _callback_over(self, st: ServerStream) -> None:
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

    async def _run(self, st: ServerStream) -> None:
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
                    raise Abort(grpc.StatusCode.INTERNAL, "the request carried no message") from None
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
                    raise Abort(grpc.StatusCode.INTERNAL, "the handler returned no response")
            st.finish(ctx._code or grpc.StatusCode.OK, ctx._details, ctx._trailing)
        except Abort as exc:
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
