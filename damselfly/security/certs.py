"""A cluster CA and node certificates (``damselfly certs init|issue``), with ``cryptography``.

Node certificates name the node's addresses as IP and DNS subjectAltNames, so that a
peer is checked against the address it was reached at, and carry the node's roles as
URI SANs ``urn:damselfly:role:ROLE`` (see ``identity.py``). Keys are ECDSA P-256: the
handshakes are cheap and every TLS stack here speaks it. Files are written to a temp
file and renamed into place; private keys are 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from damselfly.core.errors import InvalidArgument
from damselfly.security.identity import ROLE_URI_PREFIX, ROLES

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: object, issuer: object, public_key: object, days: int) -> object:
    """A certificate builder with the fields every certificate here shares: a random serial,
    valid from five minutes ago (clocks drift) for ``days``."""
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)  # type: ignore[arg-type]
        .issuer_name(issuer)  # type: ignore[arg-type]
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def self_signed_pem(names: list[str], common_name: str = "damselfly", days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed certificate naming ``names`` (IPs or DNS names) and its key, in PEM: for a
    transport that needs a certificate to run at all (QUIC) when no cluster CA is configured."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)  # type: ignore[attr-defined]
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM), _key_pem(key)


def init_ca(directory: Path | str, name: str = "damselfly cluster CA", days: int = 3650) -> Issued:
    """Make a new CA in ``directory`` (ca.pem, ca-key.pem); refuses to overwrite one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise InvalidArgument(f"a CA already exists in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # type: ignore[attr-defined]
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(Encoding.PEM), 0o644)
    return Issued(cert_path, key_path)


def issue(
    ca_dir: Path | str,
    out_dir: Path | str,
    name: str,
    *,
    ips: list[str] | tuple[str, ...] = (),
    dns: list[str] | tuple[str, ...] = (),
    roles: list[str] | tuple[str, ...] = ("peer",),
    days: int = 365,
) -> Issued:
    """Issue ``out_dir/NAME.pem`` and ``NAME-key.pem`` for a node reached at ``ips``/``dns``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise InvalidArgument(f"unknown role {bad[0]!r} (roles: {', '.join(ROLES)})")
    if not ips and not dns:
        raise InvalidArgument("a node certificate needs at least one address (--ip or --dns)")
    addresses = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise InvalidArgument(f"bad IP address {ip!r} (a DNS name goes in --dns)") from None
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise InvalidArgument(f"no CA in {ca_dir} (run `damselfly certs init --dir {ca_dir}`)") from None
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"cannot read the CA in {ca_dir}: {exc}".splitlines()[0]) from None
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(a) for a in addresses]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + r) for r in roles]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)  # type: ignore[attr-defined]
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    issued = Issued(out_dir / f"{name}.pem", out_dir / f"{name}-key.pem")
    _write(issued.key, _key_pem(key), 0o600)
    _write(issued.cert, cert.public_bytes(Encoding.PEM), 0o644)
    return issued
