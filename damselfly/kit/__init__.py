"""Building blocks for plugin authors: the public transport kit.

A transport plugin only moves bytes and sets timers; the Vortex codec (``core.vortex``)
and both halves of a request (``kit.transport``) are written once and shared by every
transport, built-in or third-party. A transport over a byte stream (a unix socket, a
vsock) subclasses ``StreamTransport`` and writes two methods:

    class UnixTransport(StreamTransport):
        name: ClassVar[str] = "unix"

        async def start_server(self, handle, host, port):
            return await asyncio.start_unix_server(handle, "/run/damselfly/vortex.sock")

        async def open_connection(self, address):
            return await asyncio.open_unix_connection(unix_path(address))

Transports with their own framing or fast paths (QUIC streams, WebRTC data channels,
RDMA, TCP's sendfile) use the parts: ``RequestReader`` and ``answer`` on the parent's
side, ``PieceResponse`` or ``PendingResponse`` on the child's, and the stream server's
bounds. ``damselfly.testing.transport.TransportConformance`` checks the result.
"""

from damselfly.kit.stream import (
    UNIX_PREFIX,
    Refusals,
    RequestChannel,
    StreamChannel,
    StreamConnection,
    StreamHandler,
    StreamServer,
    StreamTransport,
    serve_requests,
    unix_path,
)
from damselfly.kit.transport import (
    SEND_SLICE,
    FrameSink,
    ParentRefused,
    PendingResponse,
    PieceResponse,
    RequestReader,
    answer,
    error_frame,
    limits_of,
    read_region,
    split_address,
    tls_of,
    write_all,
)

__all__ = [
    "SEND_SLICE",
    "UNIX_PREFIX",
    "FrameSink",
    "ParentRefused",
    "PendingResponse",
    "PieceResponse",
    "Refusals",
    "RequestChannel",
    "RequestReader",
    "StreamChannel",
    "StreamConnection",
    "StreamHandler",
    "StreamServer",
    "StreamTransport",
    "answer",
    "error_frame",
    "limits_of",
    "read_region",
    "serve_requests",
    "split_address",
    "tls_of",
    "unix_path",
    "write_all",
]
