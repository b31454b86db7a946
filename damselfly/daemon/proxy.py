"""The daemon's HTTP proxy and registry mirror: container runtimes pull image layers through the swarm.

Two ways in, as Dragonfly's proxy has:

- **registry mirror**: a runtime sends ``GET /v2/...`` to this port as if it were the
  registry. The upstream is the ``X-Dragonfly-Registry`` header, else the ``ns``
  query parameter containerd adds (``ns=registry.example:5000``), else
  ``proxy.registry_mirror``;
- **HTTP proxy**: a request in absolute form (``GET http://host/path``) goes to that
  URL; ``CONNECT`` is tunnelled untouched (so HTTPS passes through, unseen).

Only GETs whose URL matches one of ``proxy.rules`` (default ``blobs/sha256.*``), or
that carry ``X-Dragonfly-Use-P2P: true``, go through the swarm; manifests, tokens,
pushes and everything else pass straight through, multi-value headers and bodies
intact. A swarm response streams each piece as it lands; a ``Range`` request is
answered 206 and fetches only the pieces that overlap it.

Private images stay private (``proxyswarm``): a registry blob is served from the swarm
only to a client whose own credentials the registry accepts for it, and its bytes are
checked against its digest as they are sent.

No open relay (``docs/security.md``):

- the upstream is ``http`` or ``https``, never ``file://`` or another scheme;
- ``CONNECT`` and absolute-form requests reach only ``host:port`` matching a glob of
  ``proxy.connect_allow`` (none by default: 403);
- every connection to an upstream (pass-through, credential checks, tunnels) passes the
  back-to-source policy ``security.sources`` when it connects, redirects included, so
  loopback, private, link-local and metadata addresses are refused unless allowed;
- with ``proxy.username`` set, every request (health checks aside) needs that Basic
  ``Proxy-Authorization`` (else 407), and it never goes upstream;
- a client has ``security.limits.header_timeout`` seconds to send a request's headers,
  the first on a connection and each next one after a response, or is disconnected.

Credentials a client sends stay with its request: they go upstream and into the local
download's request headers, never into a log line (URLs are logged without their query).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hmac
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from loguru import logger

from damselfly.core.errors import DamselflyError, InvalidArgument, PermissionDenied
from damselfly.daemon.proxyhttp import HOP_BY_HOP, error_of, error_response, redact
from damselfly.daemon.proxyswarm import SwarmResponder
from damselfly.oci.distribution import registry_scheme
from damselfly.security import tls
from damselfly.security.policy import SourcePolicy, policy_connector, refusal_in

if TYPE_CHECKING:
    from damselfly.config import ProxyConfig, SecurityConfig
    from damselfly.daemon.proxyswarm import ProxyContext

_REGISTRY = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")  # host[:port], whole string
UPSTREAM_SCHEMES = ("http", "https")
HEALTH_PATHS = ("/healthy", "/server/ping")
MAX_HEAD = 65536  # bytes of request line and headers a client may send
CHUNK = 1 << 20


class Proxy:
    """The listener, who may use it and where a request goes, pass-through and CONNECT; a GET
    through the swarm goes to a ``SwarmResponder``. ``security`` gives the source policy, the
    header timeout and the cluster's TLS."""

    def __init__(self, ctx: ProxyContext, config: ProxyConfig, security: SecurityConfig):
        self.ctx = ctx
        self.cfg = config
        self.rules = [re.compile(r) for r in config.rules]
        self.policy = SourcePolicy.from_config(security.sources)
        self.tls_config = security.tls
        self.header_timeout = security.limits.header_timeout
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._swarm: SwarmResponder | None = None  # with the session, at start
        # aiohttp closes a kept-alive connection whose next request has not fully arrived
        # header_timeout seconds after the last response: the header timeout of every request
        # after the first (the first is _Sniffer's).
        self._web = web.Server(self._handle, access_log=None, keepalive_timeout=self.header_timeout)
        self._tunnels: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        tls_cfg = self.tls_config
        ssl_context = None
        if self.cfg.tls:
            if not tls_cfg.enabled:
                raise InvalidArgument("proxy.tls needs security.tls (ca, cert and key)")
            ssl_context = tls.server_ssl_context(tls_cfg)  # clients show a certificate of the cluster CA
        elif not self.cfg.username:
            tls.warn_unauthenticated("the proxy (no proxy.tls, no proxy.username)", host, None)
        tls_options: dict[str, Any] = {}
        if ssl_context is not None:
            tls_options = {"ssl": ssl_context, "ssl_handshake_timeout": self.header_timeout}
        self._server = await loop.create_server(lambda: _Sniffer(self), host, self.cfg.port, **tls_options)
        self.port = self._server.sockets[0].getsockname()[1]
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            trust_env=False,
            connector=policy_connector(self.policy, limit=256),  # every upstream connection is checked
        )
        self._swarm = SwarmResponder(self.ctx, self.cfg, self.policy, self._session)
        logger.info("proxy listening on {}:{}", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tunnels):
            t.cancel()
        await self._web.shutdown(1.0)
        if self._session is not None:
            await self._session.close()

    # -- who may use the proxy, and to reach what -----------------------------------------

    def auth_refusal(self, value: str | None) -> str:
        """'' when ``Proxy-Authorization: value`` lets a client use the proxy, else why not.

        Without ``proxy.username`` everyone may; with it, Basic credentials must match
        (compared in constant time).
        """
        if not self.cfg.username:
            return ""
        if not value:
            return "proxy authentication required (Proxy-Authorization: Basic)"
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return "proxy authentication must be Basic"
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return "malformed Proxy-Authorization"
        if not hmac.compare_digest(given, f"{self.cfg.username}:{self.cfg.password}".encode()):
            return "proxy authentication failed"
        return ""

    def check_relay(self, host: str, port: int) -> None:
        """CONNECT and absolute-form requests reach only ``host:port`` that ``proxy.connect_allow`` names."""
        authority = authority_of(host, port)
        if not any(fnmatch.fnmatchcase(authority, pattern.lower()) for pattern in self.cfg.connect_allow):
            why = "not in proxy.connect_allow" if self.cfg.connect_allow else "proxy.connect_allow is empty by default"
            raise PermissionDenied(f"the proxy does not relay to {authority}: {why}")

    # -- routing -------------------------------------------------------------------------

    def upstream_url(self, request: web.BaseRequest) -> str:
        target = request._message.path  # the request-target as sent
        if not target.startswith("/"):
            return self._absolute(target)  # HTTP-proxy mode
        query = [(k, v) for k, v in parse_qsl(request.query_string, keep_blank_values=True)]
        if registry := request.headers.get("X-Dragonfly-Registry", "").strip():
            scheme, netloc = registry_base(registry, "X-Dragonfly-Registry")
        elif ns := next((v for k, v in query if k == "ns"), ""):
            scheme, netloc = registry_base(f"{registry_scheme(ns, self.cfg.insecure_registries)}://{ns}", "ns=")
        elif self.cfg.registry_mirror:
            scheme, netloc = registry_base(self.cfg.registry_mirror, "proxy.registry_mirror")
        else:
            raise InvalidArgument("no upstream: send X-Dragonfly-Registry or ?ns=, or set proxy.registry_mirror")
        rest = [(k, v) for k, v in query if k != "ns"]
        return urlunsplit((scheme, netloc, request.path, urlencode(rest), ""))

    def _absolute(self, target: str) -> str:
        """An absolute-form request-target: http or https, to a host ``proxy.connect_allow`` names."""
        if "://" not in target:
            raise InvalidArgument(f"request-target {target[:64]!r} is neither a path nor an http(s) URL")
        try:
            parts = urlsplit(target)
            port = parts.port
        except ValueError:
            raise InvalidArgument(f"bad URL {target[:64]!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in UPSTREAM_SCHEMES:
            raise PermissionDenied(f"the proxy forwards only http and https, not {scheme}://")
        if not parts.hostname:
            raise InvalidArgument(f"URL {target[:64]!r} has no host")
        self.check_relay(parts.hostname, port or (443 if scheme == "https" else 80))
        return target

    def wants_p2p(self, request: web.BaseRequest, url: str) -> bool:
        if request.method != "GET":
            return False
        if request.headers.get("X-Dragonfly-Use-P2P", "").lower() == "true":
            return True
        return any(r.search(url) for r in self.rules)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        origin_form = request._message.path.startswith("/")
        if origin_form and request.path in HEALTH_PATHS:
            return web.Response(text="OK")  # liveness probes need no credentials: nothing goes upstream
        if why := self.auth_refusal(request.headers.get("Proxy-Authorization")):
            return _auth_required(why)
        try:
            url = self.upstream_url(request)
            self.policy.check_url(url)  # names and literal addresses now; resolved ones when connecting
        except DamselflyError as exc:  # the request names no upstream the proxy may reach
            return error_response(403 if isinstance(exc, PermissionDenied) else 400, str(exc), "proxy")
        try:
            if self.wants_p2p(request, url):
                assert self._swarm is not None
                return await self._swarm.respond(request, url)
            return await self._pass_through(request, url)
        except ConnectionResetError:
            raise
        except DamselflyError as exc:
            return error_of(exc)

    # -- straight through ----------------------------------------------------------------

    async def _pass_through(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = request.content if request.body_exists else None
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                if upstream.content_length is not None:
                    resp.content_length = upstream.content_length
                await resp.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, PermissionDenied) as exc:
            if denied := refusal_in(exc):
                return error_of(denied)
            return error_response(502, f"upstream {redact(url)} failed: {exc}", "backend")

    # -- CONNECT -------------------------------------------------------------------------

    async def tunnel(self, sniffer: _Sniffer, authority: str, headers: dict[str, str]) -> None:
        """Tunnel to ``authority`` for an authenticated client, if ``proxy.connect_allow`` names it and
        the source policy lets its resolved address be reached (the address checked is the one used)."""
        transport = sniffer.transport
        assert transport is not None
        if why := self.auth_refusal(headers.get("proxy-authorization")):
            _raw_reply(transport, 407, "Proxy Authentication Required", why, _PROXY_AUTHENTICATE)
            return
        try:
            host, port = parse_authority(authority)
            self.check_relay(host, port)
            addresses = await asyncio.wait_for(self.policy.resolve(host, port), self.cfg.connect_timeout)
            reader, writer = await self._connect(addresses, port)
        except InvalidArgument as exc:
            _raw_reply(transport, 400, "Bad Request", str(exc))
            return
        except PermissionDenied as exc:
            logger.info("proxy: CONNECT refused: {}", exc)
            _raw_reply(transport, 403, "Forbidden", str(exc))
            return
        except (OSError, TimeoutError) as exc:
            _raw_reply(transport, 502, "Bad Gateway", f"cannot reach {authority}: {exc or 'timed out'}")
            return
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sniffer.upstream = writer
        if sniffer.buf:
            writer.write(sniffer.buf)
            sniffer.buf = b""
        sniffer.resume()
        try:
            while data := await reader.read(CHUNK):
                transport.write(data)
        finally:
            writer.close()
            transport.close()

    async def _connect(self, addresses: list[str], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: OSError | TimeoutError = OSError("no address")
        for address in addresses:
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, port), self.cfg.connect_timeout)
            except (OSError, TimeoutError) as exc:
                last = exc
        raise last


_PROXY_AUTHENTICATE = 'Basic realm="damselfly proxy", charset="UTF-8"'


def parse_authority(authority: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a CONNECT request."""
    host, _, port = authority.rpartition(":")
    host = host.strip("[]")
    if not host or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        raise InvalidArgument(f"CONNECT needs host:port, not {authority[:64]!r}")
    return host.lower(), int(port)


def authority_of(host: str, port: int) -> str:
    """``host:port`` as ``proxy.connect_allow`` globs match it (an IPv6 host in brackets)."""
    host = host.lower().strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def registry_base(value: str, where: str) -> tuple[str, str]:
    """(scheme, host[:port]) of the upstream registry ``value`` that ``where`` names: http or https only."""
    if "://" not in value:
        value = "https://" + value
    scheme, _, rest = value.partition("://")
    scheme = scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        raise PermissionDenied(f"{where} names a {scheme}:// upstream: the proxy forwards only http and https")
    netloc = rest.split("/", 1)[0]
    if not _REGISTRY.fullmatch(netloc):
        raise InvalidArgument(f"{where}: {value[:64]!r} is not http(s)://HOST[:PORT]")
    return scheme, netloc


def _auth_required(why: str) -> web.Response:
    resp = error_response(407, why, "proxy")
    resp.headers["Proxy-Authenticate"] = _PROXY_AUTHENTICATE
    return resp


def _raw_reply(transport: asyncio.Transport, status: int, reason: str, message: str, authenticate: str = "") -> None:
    """An error answer written straight to a connection aiohttp does not own (CONNECT), then closed."""
    body = (message.splitlines()[0] if message else reason).encode() + b"\n"
    lines = [f"HTTP/1.1 {status} {reason}", "X-Dragonfly-Error-Type: proxy", "Content-Type: text/plain; charset=utf-8"]
    if authenticate:
        lines.append(f"Proxy-Authenticate: {authenticate}")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    transport.close()


class _Sniffer(asyncio.Protocol):
    """Reads a connection's first request head: CONNECT is tunnelled here, anything else goes to aiohttp.

    A client has ``security.limits.header_timeout`` seconds to send that whole head (aiohttp's
    keep-alive timeout bounds each next one): a slow one is disconnected.
    """

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.tunnelling = False
        self.paused = False
        self.upstream: asyncio.StreamWriter | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._deadline = asyncio.get_running_loop().call_later(self.proxy.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None and not self.transport.is_closing():
            logger.info("proxy: no complete request head in {}s: client disconnected", self.proxy.header_timeout)
            self.transport.abort()

    def _head_arrived(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tunnelling:
            if self.upstream is not None:
                self.upstream.write(data)
            else:
                self.buf += data  # the upstream connection is still being made
                if len(self.buf) >= CHUNK and not self.paused:
                    self.paused = True
                    self.transport.pause_reading()
            return
        self.buf += data
        if self.buf[:1] == b"\x16":  # a TLS ClientHello on this plain-HTTP port: refuse at once, so the
            self._head_arrived()  # client falls back to HTTP now rather than after its TLS timeout
            self.transport.close()
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) >= MAX_HEAD:
                self._head_arrived()
                _raw_reply(self.transport, 431, "Request Header Fields Too Large", f"head over {MAX_HEAD} bytes")
            return  # the head is still arriving
        self._head_arrived()
        if self.buf.startswith(b"CONNECT "):
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            first = lines[0].split()
            if len(first) != 3:
                _raw_reply(self.transport, 400, "Bad Request", "CONNECT needs: CONNECT host:port HTTP/1.1")
                return
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            self.tunnelling = True
            self.buf = self.buf[end + 4 :]
            task = asyncio.get_running_loop().create_task(self.proxy.tunnel(self, first[1], headers))
            self.proxy._tunnels.add(task)
            task.add_done_callback(self.proxy._tunnels.discard)
            return
        handler = self.proxy._web()  # aiohttp's protocol takes over this connection from here
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        handler.data_received(self.buf)
        self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        if self.upstream is not None:
            self.upstream.close()
