"""The back-to-source policy: which origins a request may reach, checked where it connects.

``security.sources`` names the schemes and hosts allowed and which address ranges are
refused (loopback, private, link-local and the cloud metadata addresses, unless allowed).
A URL is checked when it is admitted; its host's *resolved addresses* are checked again
at connect time (``PolicyResolver`` for aiohttp), so a name that resolves to a refused
address, a DNS rebinding, or a redirect to one is refused too.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from damselfly.core.errors import PermissionDenied

if TYPE_CHECKING:
    import aiohttp

    from damselfly.config import SourcePolicyConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses of instance metadata services: link-local or not, never reached unless allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: treated as private

# Schemes that read this node's own files or processes: never for a request from the network
# (with any fsspec protocol whose filesystem is local; see admission.reads_this_node). The
# fsspec wrappers are here too: they read local files (reference, zip, git) or keep a local
# cache a later request would read (simplecache, filecache).
LOCAL_SCHEMES = frozenset(
    {"file", "local", "memory", "cache", "fsspec-file", "reference", "dir", "zip", "tar", "libarchive", "git", "jlab"}
    | {"simplecache", "filecache", "blockcache", "cached"}
)


@dataclass(frozen=True)
class SourcePolicy:
    schemes: frozenset[str]
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    allow_loopback: bool = False
    allow_private: bool = False
    allow_link_local: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_redirects: int = 5

    @classmethod
    def from_config(cls, cfg: SourcePolicyConfig) -> SourcePolicy:
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allow_networks)
        except ValueError as exc:
            raise PermissionDenied(f"security.sources.allow_networks: {exc}") from None
        return cls(
            schemes=frozenset(s.lower() for s in cfg.schemes),
            allow_hosts=tuple(h.lower() for h in cfg.allow_hosts),
            deny_hosts=tuple(h.lower() for h in cfg.deny_hosts),
            allow_loopback=cfg.allow_loopback,
            allow_private=cfg.allow_private,
            allow_link_local=cfg.allow_link_local,
            allow_networks=nets,
            max_redirects=cfg.max_redirects,
        )

    # -- names -----------------------------------------------------------------------

    def check_scheme(self, scheme: str) -> None:
        if scheme.lower() not in self.schemes:
            raise PermissionDenied(
                f"source policy refuses scheme {scheme!r} (security.sources.schemes: {', '.join(sorted(self.schemes))})"
            )

    def check_host(self, host: str, port: int | None = None) -> None:
        """The host *name* (or literal address) against deny_hosts and allow_hosts."""
        host = host.lower().strip("[]")
        names = [host] if port is None else [host, f"{host}:{port}"]
        if any(fnmatch.fnmatchcase(n, pat) for pat in self.deny_hosts for n in names):
            raise PermissionDenied(f"source policy refuses host {host} (security.sources.deny_hosts)")
        if self.allow_hosts and not any(fnmatch.fnmatchcase(n, pat) for pat in self.allow_hosts for n in names):
            raise PermissionDenied(f"source policy refuses host {host}: not in security.sources.allow_hosts")
        try:
            self.check_address(ipaddress.ip_address(host), host)
        except ValueError:
            pass  # a name: its addresses are checked when it is resolved

    def check_url(self, url: str) -> None:
        """Scheme and host of ``url`` (no resolution: connect-time checks do that)."""
        parts = urlsplit(url)
        self.check_scheme(parts.scheme)
        if parts.hostname:
            try:
                port = parts.port
            except ValueError:
                raise PermissionDenied(f"bad port in {url!r}") from None
            self.check_host(parts.hostname, port)

    # -- addresses ----------------------------------------------------------------------

    def refusal(self, addr: IPAddress) -> str:
        """Why ``addr`` is refused, or '' when it may be reached."""
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.allow_networks):
            return ""
        if addr in METADATA_ADDRESSES:
            return "" if self.allow_link_local else "a cloud metadata address"
        if addr.is_loopback:
            return "" if self.allow_loopback else "loopback (security.sources.allow_loopback)"
        if addr.is_link_local:
            return "" if self.allow_link_local else "link-local (security.sources.allow_link_local)"
        if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
            return "not a unicast address"
        if addr.is_private or addr in _SHARED:
            return "" if self.allow_private else "private (security.sources.allow_private)"
        return ""

    def check_address(self, addr: IPAddress, host: str = "") -> None:
        why = self.refusal(addr)
        if why:
            named = f"{host} ({addr})" if host and host != str(addr) else str(addr)
            raise PermissionDenied(f"source policy refuses {named}: {why}")

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Every address ``host`` resolved to must pass (one refused is enough to refuse)."""
        for a in addresses:
            self.check_address(ipaddress.ip_address(a.split("%", 1)[0]), host)

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; the checked addresses."""
        import asyncio

        self.check_host(host, port)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = sorted({i[4][0] for i in infos})
        self.check_addresses(host, addrs)
        return addrs


async def check_endpoint(policy: SourcePolicy, url: str, setting: str) -> None:
    """An endpoint a client library connects to on its own (an S3 endpoint, say): its host
    and every address it resolves to, checked before the library is handed it. ``setting``
    names where the endpoint came from, for the message."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise PermissionDenied(f"bad endpoint {url!r} ({setting})") from None
    if not host:
        raise PermissionDenied(f"endpoint {url!r} names no host ({setting})")
    await policy.resolve(host, port or (443 if parts.scheme == "https" else 80))  # OSError when it does not resolve


def policy_resolver(policy: SourcePolicy) -> aiohttp.abc.AbstractResolver:
    """An aiohttp resolver that refuses hosts and addresses the policy refuses: every
    connection (redirects included) an aiohttp session makes with it is checked."""
    from aiohttp.resolver import DefaultResolver

    class PolicyResolver(DefaultResolver):  # type: ignore[misc]
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
            policy.check_host(host, port)
            infos = await super().resolve(host, port, family)
            policy.check_addresses(host, [i["host"] for i in infos])
            return infos

    return PolicyResolver()


def policy_connector(policy: SourcePolicy, **kwargs: Any) -> aiohttp.TCPConnector:
    """An aiohttp connector whose every connection is checked against ``policy``.

    The check sits where the connector turns a host into addresses, so it covers names
    (every address they resolve to, cached or not), literal addresses (which aiohttp
    never hands to a resolver) and every redirect's new host alike."""
    return _connector_class()(policy, **kwargs)


@functools.cache
def _connector_class() -> type[aiohttp.TCPConnector]:
    import aiohttp

    class PolicyConnector(aiohttp.TCPConnector):
        def __init__(self, policy: SourcePolicy, **kwargs: Any):
            super().__init__(**kwargs)
            self.policy = policy

        async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[Any]:
            self.policy.check_host(host, port)
            hosts = await super()._resolve_host(host, port, traces=traces)
            self.policy.check_addresses(host, [h["host"] for h in hosts])
            return hosts

    return PolicyConnector


def refusal_in(exc: BaseException) -> PermissionDenied | None:
    """The policy's refusal inside an exception a client library wrapped it in (aiohttp
    reports a resolver's error as ClientConnectorDNSError with it as ``os_error``)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PermissionDenied):
            return e
        stack += [getattr(e, "os_error", None), e.__cause__, e.__context__]
    return None
