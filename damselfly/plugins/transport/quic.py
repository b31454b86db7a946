"""``quic``: Vortex frames over QUIC (aioquic), as Dragonfly serves them on port 4006.

One QUIC connection per parent, one bidirectional stream per piece request: the
child writes a DownloadPiece frame and ends its side, the parent answers with the
piece (or an Error frame) and ends its side. A parent that breaks off mid-piece
resets the stream; the connection and its other streams live on.

aioquic keeps whatever is written in a stream's send buffer until the peer acks it,
and grants a peer more receive credit as bytes arrive rather than as the
application consumes them. Both would let memory grow with the piece length, so
this plugin adds its own flow control on each side:

- the parent writes a slice only while the stream holds less than ``send_window``
  bytes not yet acked, and serves at most ``max_sending`` streams at once, so a
  daemon holds at most about ``send_window * max_sending`` whatever the piece
  lengths and however many children it serves;
- the child grants a stream credit only up to what its storage has taken plus
  ``receive_window``, so a slow disk holds back the parent through QUIC's own
  MAX_STREAM_DATA frames.

Security: with ``security.tls`` (the daemon's cluster CA, certificate and key) both
sides present that certificate and check the other's, mutual TLS as on TCP: a parent
refuses a child without a certificate chaining to the CA, and a child checks that the
parent's certificate chains to it and names the address dialled. Without it, a
daemon makes a self-signed certificate at first start (kept in its state dir) unless
``certificate``/``private_key`` are configured; with ``ca`` set, a child checks the
parent's certificate against it, and ``require_client_cert`` makes the parent ask
every child for a certificate signed by that CA.

Bounds (``security.limits``): a parent holds at most ``piece_connections`` QUIC
connections (past it, a new one is closed at once), a connection idle for
``piece_idle_timeout`` (or this plugin's ``idle_timeout``, the smaller) is dropped,
and one whose child sends more than ``vortex_error_frames`` bad requests (Error
frames among them) is closed, as is a child's connection to a parent that answers
with more Error frames than that.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PeerError, ProtocolError
from damselfly.hookspecs import hookimpl
from damselfly.kit import ParentRefused, PendingResponse, answer, limits_of, split_address, tls_of

if TYPE_CHECKING:
    from damselfly.contracts import Registry


ALPN = "vortex"
_QUIC_INTERNAL_ERROR = 0x1
_QUIC_CONNECTION_REFUSED = 0x2
_QUIC_PROTOCOL_VIOLATION = 0xA
_STREAM_ABORTED = 0x101


class QuicConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    port: int = Field(0, ge=0, le=65535, description="UDP port to serve on (0: the daemon's choice).")
    certificate: Path | None = Field(None, description="PEM certificate chain; a self-signed one is made if unset.")
    private_key: Path | None = Field(None, description="PEM private key of `certificate`.")
    ca: Path | None = Field(None, description="CA bundle: children check parents against it (and parents children).")
    require_client_cert: bool = Field(False, description="Parents refuse children without a certificate from `ca`.")
    send_window: int = Field(1 << 20, ge=64 * 1024, description="Bytes a parent leaves unacked per stream.")
    max_sending: int = Field(32, ge=1, description="Streams a parent answers at once (others wait).")
    receive_window: int = Field(2 << 20, ge=64 * 1024, description="Bytes of credit a child grants beyond its disk.")
    max_datagram_size: int = Field(
        1452,
        ge=1200,
        le=16000,
        description="Largest UDP payload sent. 1452 suits Ethernet paths; loopback and jumbo-frame LANs "
        "move several times faster with 8192.",
    )
    idle_timeout: float = Field(60.0, gt=0, description="Seconds of silence before a connection is dropped.")


# -- certificates -------------------------------------------------------------------


def self_signed(directory: Path | None, names: list[str]) -> tuple[bytes, bytes]:
    """A certificate and key in PEM, kept under ``directory`` (made there at first use)."""
    if directory is not None:
        cert_file, key_file = directory / "quic-cert.pem", directory / "quic-key.pem"
        if cert_file.exists() and key_file.exists():
            return cert_file.read_bytes(), key_file.read_bytes()
    from damselfly.security.certs import self_signed_pem

    cert_pem, key_pem = self_signed_pem(names)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for path, data in ((cert_file, cert_pem), (key_file, key_pem)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o600)
            tmp.replace(path)
    return cert_pem, key_pem


def _load_chain(config: Any, cert_pem: bytes, key_pem: bytes) -> None:
    from aioquic.tls import load_pem_private_key, load_pem_x509_certificates

    certs = load_pem_x509_certificates(cert_pem)
    config.certificate, config.certificate_chain = certs[0], certs[1:]
    config.private_key = load_pem_private_key(key_pem)


# -- the parent's side ----------------------------------------------------------------


@functools.cache
def _server_classes() -> tuple[type, type]:
    """Built on first use, so importing the plugin does not need aioquic."""
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.quic import events
    from aioquic.quic.connection import QuicConnection
    from aioquic.tls import verify_certificate

    class AskingConnection(QuicConnection):
        """Asks the client for a certificate (aioquic's server does not by itself)."""

        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls._request_client_certificate = True

    class ServerProtocol(QuicConnectionProtocol):
        def __init__(self, quic: QuicConnection, *, plugin: QuicTransport, server: _Server, **kw: Any):
            if plugin.client_ca is not None:
                quic.__class__ = AskingConnection  # same state, one more TLS step
            super().__init__(quic, **kw)
            self.plugin = plugin
            self.server = server
            self.trusted = plugin.client_ca is None
            self.requests: dict[int, vortex.Decoder] = {}
            self.answering: dict[int, asyncio.Task[None]] = {}
            self.acked = asyncio.Event()
            self.bad_requests = 0
            # past the cap a connection is closed at its first datagram, before it may ask for anything
            self.refused = len(server.protocols) >= server.limits.piece_connections
            if not self.refused:
                server.protocols.add(self)

        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            super().datagram_received(data, addr)
            if self.refused:  # past the cap: CONNECTION_CLOSE as soon as there are keys to send it with
                if self._quic._close_event is None:
                    self.server.refusals += 1
                    self._quic.close(error_code=_QUIC_CONNECTION_REFUSED, reason_phrase="too many connections")
                    self.transmit()
                return
            self.acked.set()  # acks may have freed send buffers: writers look again
            self.acked = asyncio.Event()

        def quic_event_received(self, event: events.QuicEvent) -> None:
            if isinstance(event, events.HandshakeCompleted) and not self.trusted:
                self._check_client()
            elif isinstance(event, events.StreamDataReceived) and self.trusted:
                self._request_bytes(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                task = self.answering.pop(event.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(event, events.ConnectionTerminated):
                for task in self.answering.values():
                    task.cancel()
                self.acked.set()
                self.server.protocols.discard(self)

        def _check_client(self) -> None:
            tls = self._quic.tls
            try:
                if tls._peer_certificate is None:
                    raise ValueError("no certificate")
                verify_certificate(
                    certificate=tls._peer_certificate,
                    chain=tls._peer_certificate_chain,
                    cafile=str(self.plugin.client_ca),
                )
            except Exception as exc:  # any failure to verify refuses the child
                logger.warning("refusing a QUIC child: its certificate does not verify: {}", exc)
                self.close(error_code=_QUIC_INTERNAL_ERROR, reason_phrase="client certificate refused")
                return
            self.trusted = True

        def _request_bytes(self, stream_id: int, data: bytes, end: bool) -> None:
            decoder = self.requests.setdefault(stream_id, vortex.Decoder(max_frame=vortex.DOWNLOAD_PIECE_SIZE))
            try:
                decoder.receive_data(data)
                event = decoder.next_event()
            except ProtocolError as exc:
                self._reply_error(stream_id, str(exc))
                return
            if event is vortex.NEED_DATA:
                if end:
                    self.requests.pop(stream_id, None)
                return
            self.requests.pop(stream_id, None)
            if isinstance(event, vortex.Close):
                self.close()
            elif isinstance(event, vortex.DownloadPiece):
                task = asyncio.get_running_loop().create_task(self._answer(stream_id, event))
                self.answering[stream_id] = task
            else:
                self._reply_error(stream_id, f"unexpected {type(event).__name__}")

        def _reply_error(self, stream_id: int, message: str) -> None:
            self.requests.pop(stream_id, None)
            self.bad_requests += 1
            cap = self.server.limits.vortex_error_frames
            if self.bad_requests > cap:  # a child that keeps sending errors or garbage: drop it
                logger.warning("closing a QUIC child: more than {} bad requests (the last: {})", cap, message)
                self.close(error_code=_QUIC_PROTOCOL_VIOLATION, reason_phrase="too many bad requests")
                return
            frame = vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, message)
            self._quic.send_stream_data(stream_id, frame, end_stream=True)
            self.transmit()

        def unacked(self, stream_id: int) -> int:
            stream = self._quic._streams.get(stream_id)
            return len(stream.sender._buffer) if stream is not None else 0

        async def _answer(self, stream_id: int, req: vortex.DownloadPiece) -> None:
            sink = _StreamSink(self, stream_id)
            try:
                async with self.server.sending:
                    await answer(sink, self.server.lookup, req)
                self._quic.send_stream_data(stream_id, b"", end_stream=True)
            except PeerError as exc:
                logger.warning("resetting QUIC stream {}: {}", stream_id, exc)
                self._quic.reset_stream(stream_id, _STREAM_ABORTED)
            except asyncio.CancelledError:
                return
            finally:
                self.answering.pop(stream_id, None)
            self.transmit()

    return ServerProtocol, AskingConnection


class _StreamSink:
    """What ``answer`` writes to: one stream, held back while it has ``send_window`` unacked."""

    def __init__(self, protocol: Any, stream_id: int):
        self.protocol = protocol
        self.stream_id = stream_id
        self.window = protocol.plugin.options.send_window

    def write(self, data: bytes | memoryview) -> None:
        self.protocol._quic.send_stream_data(self.stream_id, bytes(data))

    async def drain(self) -> None:
        p = self.protocol
        p.transmit()
        while p.unacked(self.stream_id) >= self.window:
            if p._closed.is_set():
                raise PeerError("the child went away")
            await p.acked.wait()


class _Server:
    def __init__(self, lookup: PieceLookup, max_sending: int, limits: Any):
        self.lookup = lookup
        self.sending = asyncio.Semaphore(max_sending)
        self.limits = limits
        self.refusals = 0  # datagrams of connections refused past the cap
        self.protocols: set[Any] = set()
        self.quic_server: Any = None
        self.port = 0

    @property
    def connections(self) -> int:
        """Connections held now."""
        return len(self.protocols)

    async def close(self) -> None:
        for p in list(self.protocols):
            for task in list(p.answering.values()):
                task.cancel()
            p.close()
        if self.quic_server is not None:
            self.quic_server.close()


# -- the child's side -----------------------------------------------------------------


@functools.cache
def _client_classes() -> tuple[type, type]:
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.quic import events
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicFrameType

    class CreditedConnection(QuicConnection):
        """Raises a stream's receive credit only as the application consumes its bytes."""

        def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
            if stream.max_stream_data_local_sent == stream.max_stream_data_local:
                return
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=16,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    class ClientProtocol(QuicConnectionProtocol):
        def __init__(self, quic: QuicConnection, **kw: Any):
            super().__init__(quic, **kw)
            self.requests: dict[int, PendingResponse] = {}
            self.lost: Exception | None = None
            self.heard = asyncio.Event()

        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            super().datagram_received(data, addr)
            self.heard.set()

        async def confirmed(self) -> None:
            """Until the server confirms the handshake (HANDSHAKE_DONE): it may still refuse our certificate."""
            while not self._quic._handshake_confirmed:
                if self.lost is not None:
                    raise self.lost
                self.heard.clear()
                await self.heard.wait()

        def quic_event_received(self, event: events.QuicEvent) -> None:
            # not the base class's handler: it would copy every byte into a StreamReader
            if isinstance(event, events.StreamDataReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req.receive(event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req.fail(PeerError(f"parent reset the stream (code {event.error_code})"))
            elif isinstance(event, events.ConnectionTerminated):
                self.lost = PeerError(f"parent closed the QUIC connection: {event.reason_phrase or event.error_code}")
                for req in self.requests.values():
                    req.fail(self.lost)

        def grant(self, stream_id: int, upto: int) -> None:
            stream = self._quic._streams.get(stream_id)
            if stream is not None and upto > stream.max_stream_data_local:
                stream.max_stream_data_local = upto
                self.transmit()

    return ClientProtocol, CreditedConnection


class QuicPieceConnection(PieceConnection):
    def __init__(
        self,
        protocol: Any,
        transport: asyncio.DatagramTransport,
        window: int,
        max_errors: int = vortex.DEFAULT_MAX_ERRORS,
    ):
        self._p = protocol
        self._transport = transport
        self._window = window
        self._closed = False
        self._errors = 0  # Error frames the parent answered with, over all streams
        self._max_errors = max_errors

    @property
    def broken(self) -> bool:
        return self._closed or self._p.lost is not None

    def _count_error(self) -> None:
        """One more Error frame; past the cap the connection is dropped (without blaming the parent)."""
        self._errors += 1
        if self._errors > self._max_errors:
            self._p.lost = PeerError(f"dropping the connection: parent sent more than {self._max_errors} Error frames")
            self._p.close(error_code=_QUIC_PROTOCOL_VIOLATION, reason_phrase="too many Error frames")
            raise self._p.lost

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        p = self._p
        if self.broken:
            raise PeerError(f"connection is broken: {p.lost or 'closed'}")
        stream_id = p._quic.get_next_available_stream_id()
        req = p.requests[stream_id] = PendingResponse(number)
        try:
            p._quic.send_stream_data(stream_id, vortex.encode_download_piece(task_id, number), end_stream=True)
            p.transmit()
            return await req.deliver(
                sink, min(256 * 1024, self._window // 4), lambda taken: p.grant(stream_id, taken + self._window)
            )
        except (NotFound, ParentRefused):  # an Error frame: the stream is done, the connection lives on
            self._count_error()
            raise
        except (DamselflyError, asyncio.CancelledError):
            self._reset(stream_id)
            raise
        finally:
            p.requests.pop(stream_id, None)

    def _reset(self, stream_id: int) -> None:
        try:
            stream = self._p._quic._streams.get(stream_id)
            if stream is not None and not stream.receiver.is_finished:
                self._p._quic.stop_stream(stream_id, _STREAM_ABORTED)
                self._p.transmit()
        except Exception:  # the stream may already be gone; nothing to tell the parent then
            pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for req in self._p.requests.values():
            req.fail(PeerError("closed"))
        self._p.close()
        try:
            await asyncio.wait_for(self._p.wait_closed(), 1)
        except TimeoutError:
            pass
        self._transport.close()


class QuicTransport(Transport):
    name: ClassVar[str] = "quic"
    Config = QuicConfig
    options: QuicConfig

    @classmethod
    def available(cls) -> str | None:
        try:
            import aioquic  # noqa: F401
        except ImportError:
            return "aioquic is not installed (pip install 'damselfly[quic]')"
        return None

    @property
    def client_ca(self) -> Path | None:
        """The CA a parent checks children's certificates against; None: it asks for none."""
        cfg = tls_of(self.security)
        if cfg is not None:
            return cfg.ca
        return self.options.ca if self.options.require_client_cert else None

    def _configuration(self, is_client: bool, names: list[str]) -> Any:
        from aioquic.quic.configuration import QuicConfiguration

        o = self.options
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=min(o.idle_timeout, limits_of(self.security).piece_idle_timeout),
            max_stream_data=o.receive_window,
            max_datagram_size=o.max_datagram_size,
        )
        cfg = tls_of(self.security)
        if cfg is not None:  # the cluster's mutual TLS: our certificate both ways, theirs checked against the CA
            try:
                config.load_cert_chain(cfg.cert, cfg.key)
                config.load_verify_locations(cafile=str(cfg.ca))
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"security.tls: cannot load the certificate, key or CA: {exc}") from None
            config.verify_mode = ssl.CERT_REQUIRED
            return config
        if o.certificate is not None:
            if o.private_key is None:
                raise InvalidArgument("quic: `certificate` needs `private_key`")
            try:
                config.load_cert_chain(o.certificate, o.private_key)
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"quic: cannot load {o.certificate}: {exc}") from None
        elif not is_client:
            _load_chain(config, *self_signed(self.state_dir, names))
        if o.ca is not None:
            config.load_verify_locations(cafile=str(o.ca))
            config.verify_mode = ssl.CERT_REQUIRED
        else:
            config.verify_mode = ssl.CERT_NONE  # pieces are checked by digest, not by who sent them
        return config

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        from aioquic.asyncio import serve

        if self.options.require_client_cert and self.options.ca is None:
            raise InvalidArgument("quic: `require_client_cert` needs `ca`")
        server_protocol, _ = _server_classes()
        server = _Server(lookup, self.options.max_sending, limits_of(self.security))
        config = self._configuration(False, [host, "localhost"])

        def make(quic: Any, **kw: Any) -> Any:
            return server_protocol(quic, plugin=self, server=server, **kw)

        server.quic_server = await serve(host, port or self.options.port, configuration=config, create_protocol=make)
        server.port = server.quic_server._transport.get_extra_info("sockname")[1]
        return server

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        host, port = split_address(address)
        client_protocol, credited = _client_classes()
        config = self._configuration(True, [])
        cfg = tls_of(self.security)
        # Under the cluster's TLS aioquic checks the chain and this plugin the name (below): aioquic's own
        # name check (service_identity) cannot parse the certificates' role URIs.
        config.server_name = None if cfg is not None else host
        if cfg is None and self.options.certificate is None and self.options.require_client_cert:
            _load_chain(config, *self_signed(self.state_dir, ["localhost"]))
        loop = asyncio.get_running_loop()
        quic = credited(configuration=config)
        try:
            infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
            remote = infos[0][4]
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: client_protocol(quic), remote_addr=remote[:2]
            )
        except OSError as exc:
            raise PeerError(f"cannot reach {address}: {exc}") from None
        protocol.connect(remote)
        try:
            async with asyncio.timeout(timeout):
                await protocol.wait_connected()
                await protocol.confirmed()
            if cfg is not None and cfg.verify_address:
                _check_parent_name(protocol._quic.tls._peer_certificate, host)
        except (TimeoutError, ConnectionError, PeerError) as exc:
            transport.close()
            reason = protocol.lost or exc or "timeout"
            raise PeerError(f"QUIC handshake with {address} failed: {reason}") from None
        return QuicPieceConnection(
            protocol, transport, self.options.receive_window, limits_of(self.security).vortex_error_frames
        )


def _check_parent_name(certificate: Any, host: str) -> None:
    """PeerError unless the parent's (verified) certificate names ``host``, the address dialled."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from damselfly.security.identity import identity_from_der

    if certificate is None:
        raise PeerError("the parent presented no certificate")
    who = identity_from_der(certificate.public_bytes(Encoding.DER))
    try:
        ipaddress.ip_address(host)
        named = who.names_ip(host)
    except ValueError:
        named = host.lower() in who.dns
    if not named:
        names = ", ".join(sorted(who.ips | who.dns)) or "nothing"
        raise PeerError(f"the parent's certificate names {names}, not {host}")


@hookimpl
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    registry.add(QuicTransport)
