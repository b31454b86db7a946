"""TLS contexts and gRPC credentials from ``security.tls``: mutual TLS everywhere.

Servers require a client certificate that chains to the cluster CA; clients verify
that the server's certificate names the address they dialled (an IP SAN for an IP,
a DNS SAN for a name), which upstream Dragonfly does not check. Without
``security.tls`` every helper here falls back to plaintext, and ``warn_unauthenticated``
says so loudly for a listener that other hosts can reach.

Servers also check the other way (with ``verify_address``): the client's certificate must
name the IP address the connection comes from, so a certificate stolen from one node is
no use from another. gRPC's TLS does not do this, so damselfly does it itself:
damselfly.rpc at the handshake (``add_secure_port``'s ``peer_check``), grpcio servers in an
interceptor (``server_interceptors``) that runs ``check_peer_address`` before every call.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from loguru import logger

from damselfly.core.errors import InvalidArgument
from damselfly.security.identity import PeerIdentity, identity_from_der, identity_from_pem

if TYPE_CHECKING:
    import grpc

    from damselfly.config import TlsConfig


def _files(cfg: TlsConfig) -> tuple[bytes, bytes, bytes]:
    assert cfg.ca is not None
    assert cfg.cert is not None
    assert cfg.key is not None
    try:
        return cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"security.tls: cannot read {exc.filename}: {exc.strerror}") from None


def _context(cfg: TlsConfig, protocol: int, alpn: Sequence[str]) -> ssl.SSLContext:
    """A context holding our certificate and trusting the cluster CA alone."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        ctx.load_verify_locations(cafile=str(cfg.ca))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"security.tls: cannot load the certificate, key or CA: {exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_ssl_context(cfg: TlsConfig, alpn: Sequence[str] = (), *, require_client_cert: bool = True) -> ssl.SSLContext:
    """A server context: our certificate, and the peer's must chain to the cluster CA."""
    ctx = _context(cfg, ssl.PROTOCOL_TLS_SERVER, alpn)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(cfg: TlsConfig, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A client context: our certificate, and the server's must chain to the CA and name the
    address dialled (pass that address as ``server_hostname``)."""
    ctx = _context(cfg, ssl.PROTOCOL_TLS_CLIENT, alpn)
    ctx.check_hostname = cfg.verify_address
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    import grpc

    ca, cert, key = _files(cfg)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def grpc_channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    import grpc

    ca, cert, key = _files(cfg)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def grpc_channel(address: str, cfg: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: mutual TLS when ``cfg`` is enabled (the server's
    certificate must name the host part of ``address``: grpc checks it whatever
    ``verify_address`` says), else plaintext."""
    import grpc

    if cfg is None or not cfg.enabled:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, grpc_channel_credentials(cfg), options=list(options))


def add_port(server: Any, address: str, cfg: TlsConfig | None) -> int:
    """Bind ``server`` (grpcio's or damselfly.rpc's) at ``address``: mTLS when configured.

    damselfly.rpc checks at the handshake that the client's certificate names the address it
    connects from (with ``verify_address``); a grpcio server needs ``server_interceptors(cfg)``
    given to ``grpc.aio.server`` for that check."""
    if cfg is None or not cfg.enabled:
        return int(server.add_insecure_port(address))
    if hasattr(server, "add_secure_port") and getattr(server, "takes_ssl_context", False):  # damselfly.rpc.server
        check = cert_names_ip if cfg.verify_address else None
        return int(server.add_secure_port(address, server_ssl_context(cfg, alpn=("h2",)), peer_check=check))
    return int(server.add_secure_port(address, grpc_server_credentials(cfg)))


def cert_names_ip(der: bytes, ip: str) -> bool:
    """The certificate (DER) names ``ip`` among its IP subjectAltNames."""
    return bool(der) and _identity_of_der(der).names_ip(plain_ip(ip))


@functools.lru_cache(maxsize=1024)
def _identity_of_der(der: bytes) -> PeerIdentity:
    return identity_from_der(der)


@functools.lru_cache(maxsize=1024)
def _identity_of_pem(pem: bytes) -> PeerIdentity:
    return identity_from_pem(pem)


def peer_address_problem(context: Any) -> str | None:
    """Why the caller's certificate does not fit the connection it came on, or None when it
    does (or when the call came in plaintext: there is nothing to check then). ``context`` is
    a grpcio or damselfly.rpc servicer context."""
    der_of = getattr(context, "peer_certificate", None)
    if der_of is not None:  # damselfly.rpc.server
        der = der_of()
        if not der:
            return None
        identity = _identity_of_der(der)
    else:
        auth = getattr(context, "auth_context", None)
        pems = (auth().get("x509_pem_cert") or []) if auth is not None else []
        if not pems:
            return None
        identity = _identity_of_pem(pems[0])
    ip = peer_ip(context.peer())
    if not ip:
        return f"cannot tell the address of the caller {context.peer()!r}"
    if not identity.names_ip(ip):
        return f"the client certificate ({identity.common_name}) does not name {ip}, the address it connects from"
    return None


async def check_peer_address(context: Any) -> None:
    """Abort the call with PERMISSION_DENIED when the caller's certificate does not name the
    IP address it connects from (a no-op in plaintext)."""
    import grpc

    problem = peer_address_problem(context)
    if problem is not None:
        logger.warning("SECURITY: refused a call from {}: {}", context.peer(), problem)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)


def server_interceptors(cfg: TlsConfig | None) -> list[Any]:
    """Interceptors for ``grpc.aio.server(interceptors=...)``: with TLS and ``verify_address``,
    one that runs :func:`check_peer_address` before every call; else none."""
    if cfg is None or not cfg.enabled or not cfg.verify_address:
        return []
    return [_interceptor_class()()]


@functools.cache
def _interceptor_class() -> type:
    import grpc

    class PeerAddressInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        """Every method's behaviour runs :func:`check_peer_address` first."""

        async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
            handler = await continuation(details)
            return None if handler is None else _checked_handler(handler)

    return PeerAddressInterceptor


def _checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        async def stream(request: Any, context: Any) -> Any:
            await check_peer_address(context)
            agen = fn(request, context)
            try:
                async for message in agen:
                    yield message
            finally:
                await agen.aclose()

        return stream

    async def call(request: Any, context: Any) -> Any:
        await check_peer_address(context)
        result = fn(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return call


def _checked_handler(handler: Any) -> Any:
    import grpc

    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    for fn, make in kinds:
        if fn is not None:
            return make(
                _checked(fn),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_unauthenticated(what: str, bind_host: str, cfg: TlsConfig | None) -> bool:
    """Log loudly when ``what`` listens beyond loopback with no TLS; True when it warned."""
    if (cfg is not None and cfg.enabled) or is_loopback(bind_host):
        return False
    logger.warning(
        "SECURITY: {} listens on {} WITHOUT TLS: any host that reaches it is trusted, unauthenticated. "
        "Set security.tls (ca, cert, key; `damselfly certs init|issue`) to require mutual TLS.",
        what,
        bind_host,
    )
    return True


def peer_ip(grpc_peer: str) -> str:
    """The IP in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, grpcio's
    ``ipv6:%5B::1%5D:5``), an IPv4-mapped IPv6 address as IPv4; '' for others."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return plain_ip(unquote(rest).rpartition(":")[0].strip("[]"))
    return ""


def plain_ip(ip: str) -> str:
    """``ip``, or the IPv4 address inside an IPv4-mapped IPv6 one (a dual-stack listener's view)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else ip
