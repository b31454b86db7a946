"""What both ends of a gRPC connection share above the framing.

:class:`Endpoint` binds a :class:`~damselfly.rpc.framing.Framing` to an asyncio transport:
it writes what the framing queued once per event-loop turn (one ``write`` for all the
frames of that turn), closes the transport when the framing gives up, and learns the
peer's address and, over TLS, its verified certificate. :class:`RequestStream` holds the
messages one end receives on a stream, for an async iterator or for callbacks.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from damselfly.rpc.framing import Framing

TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS peer has to finish its handshake


class Abort(Exception):
    """Ends the call it is raised in with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class Endpoint(Framing, asyncio.Protocol):
    """A framing bound to an asyncio transport; the server's and client's connections are these."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_cert: bytes | None = None  # DER of the verified certificate of the peer, over TLS

    def _schedule_flush(self) -> None:
        self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(bytes(self.out))
        self.out.clear()

    def _close(self) -> None:
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # A peer that sends (PINGs, SETTINGS, requests) and never reads would grow the transport's
    # write buffer without bound: while it is over the high-water mark, nothing more is read
    # from that peer, so nothing more is answered.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

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
        self.initiate()


class RequestStream:
    """The messages one end receives on a stream (a call's requests, on the server), as an
    async iterator; or, once :meth:`listen` is called, handed to callbacks as they arrive."""

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
            self.deliver(self.items.popleft())
        if self.ended:
            self.on_message = self.on_end = None  # nothing more comes (and no cycle is kept)
            if self.error is None:
                on_end()

    def deliver(self, raw: Any) -> None:
        """Hand ``raw`` to the listener (``on_message`` is set): parsed, or the call fails."""
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
        """A message arrived: to the listener, or queued for the iterator."""
        if self.on_message is not None:
            self.deliver(item)
            return
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def end(self, error: BaseException | None = None) -> None:
        """No more messages come; an iterator raises ``error`` once it has read the rest."""
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

    def __aiter__(self) -> RequestStream:
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
            raise Abort(grpc.StatusCode.INTERNAL, f"cannot parse the request: {exc}") from exc
