"""Who a peer is, read from the certificate it presented on an mTLS connection.

A damselfly node certificate (``damselfly certs issue``) names the node's addresses
as IP and DNS subjectAltNames and its roles as URI SANs ``urn:damselfly:role:ROLE``
(``peer``, ``seed``, ``scheduler``, ``client``). The scheduler authorises by these:
a host may announce only a host id made of its own addresses, and only a ``seed``
certificate may announce a seed host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

ROLE_URI_PREFIX = "urn:damselfly:role:"
ROLES = ("peer", "seed", "scheduler", "client")


@dataclass(frozen=True)
class PeerIdentity:
    """The names and roles a verified certificate gives its holder."""

    common_name: str = ""
    ips: frozenset[str] = field(default_factory=frozenset)
    dns: frozenset[str] = field(default_factory=frozenset)
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_seed(self) -> bool:
        return "seed" in self.roles

    def names_ip(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip).compressed in self.ips
        except ValueError:
            return False

    def names_hostname(self, hostname: str) -> bool:
        return hostname.lower() in self.dns or hostname == self.common_name

    def may_be_host(self, ip: str, hostname: str) -> bool:
        """A host announcing ``ip`` and ``hostname`` is this certificate's holder."""
        return self.names_ip(ip) and self.names_hostname(hostname)


def identity_from_der(der: bytes) -> PeerIdentity:
    """Read the identity out of a DER certificate (already verified by the TLS layer)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cn = ""
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        cn = str(attr.value)
    ips: set[str] = set()
    dns: set[str] = set()
    roles: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        ips = {ipaddress.ip_address(ip).compressed for ip in san.get_values_for_type(x509.IPAddress)}
        dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(ROLE_URI_PREFIX):
                roles.add(uri[len(ROLE_URI_PREFIX) :])
    return PeerIdentity(cn, frozenset(ips), frozenset(dns), frozenset(roles))


def identity_from_pem(pem: bytes) -> PeerIdentity:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return identity_from_der(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))


def identity_of(context: Any) -> PeerIdentity | None:
    """The verified identity of the caller of a gRPC method: grpcio's ``auth_context()``
    or damselfly.rpc's ``peer_certificate()`` (DER); None on a plaintext connection."""
    der_of = getattr(context, "peer_certificate", None)
    if der_of is not None:  # damselfly.rpc.server
        der = der_of()
        return identity_from_der(der) if der else None
    auth = getattr(context, "auth_context", None)
    if auth is None:
        return None
    pems = auth().get("x509_pem_cert") or []
    return identity_from_pem(pems[0]) if pems else None
