"""TLS contexts and gRPC credentials from ``security.tls``: mutual TLS everywhere.

Servers require a client certificate that chains to the cluster CA; clients verify
that the server's certificate names the address they dialled (an IP SAN for an IP,
a DNS SAN for a name), which upstream Dragonfly does not check. Without
``security.tls`` every helper here falls back to plaintext, and ``warn_unauthenticated``
says so loudly for a listener that other hosts can reach.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

from damselfly.core.errors import InvalidArgument

if TYPE_CHECKING:
    import grpc

    from damselfly.config import TlsConfig


def _files(cfg: TlsConfig) -> tuple[bytes, bytes, bytes]:
    assert cfg.ca is not None and cfg.cert is not None and cfg.key is not None
    try:
        return cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"security.tls: cannot read {exc.filename}: {exc.strerror}") from None


def server_ssl_context(cfg: TlsConfig, alpn: Sequence[str] = (), *, require_client_cert: bool = True) -> ssl.SSLContext:
    """A server context: our certificate, and the peer's must chain to the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        ctx.load_verify_locations(cafile=str(cfg.ca))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"security.tls: cannot load the certificate, key or CA: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_ssl_context(cfg: TlsConfig, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A client context: our certificate, and the server's must chain to the CA and name the
    address dialled (pass that address as ``server_hostname``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        ctx.load_verify_locations(cafile=str(cfg.ca))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"security.tls: cannot load the certificate, key or CA: {exc}") from None
    ctx.check_hostname = cfg.verify_address
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
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
    certificate must name the host part of ``address``), else plaintext."""
    import grpc

    if cfg is None or not cfg.enabled:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, grpc_channel_credentials(cfg), options=list(options))


def add_port(server: Any, address: str, cfg: TlsConfig | None) -> int:
    """Bind ``server`` (grpcio's or h2grpc's) at ``address``: mTLS when configured."""
    if cfg is None or not cfg.enabled:
        return int(server.add_insecure_port(address))
    if hasattr(server, "add_secure_port") and getattr(server, "takes_ssl_context", False):  # damselfly.h2grpc
        return int(server.add_secure_port(address, server_ssl_context(cfg, alpn=("h2",))))
    return int(server.add_secure_port(address, grpc_server_credentials(cfg)))


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
    """The IP in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); '' for others."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""
