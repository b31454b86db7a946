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

Private images stay private: a registry blob is a path ``/v2/<name>/blobs/<digest>``
as ``ids.parse_blob_path`` reads it (anchored, the OCI name grammar), the one parser
both the credential check and the task id use. Before such a blob is served from the
swarm, the client's own credentials (its ``Authorization`` and ``Cookie``, or none)
are checked against the registry with a HEAD of that blob, remembered
``auth_cache_ttl`` seconds per registry, repository and credentials. A client the
registry refuses gets the registry's answer (401 and its ``WWW-Authenticate``), even
when the blob is on this disk. The blob of a pull with credentials is a task bound to
its registry and repository (``ids.bound_blob_content``), so a registry that says yes
to everything authorises only its own copy. A whole blob is hashed as it is sent:
bytes that do not match its digest break the response off before its last piece.

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
import hashlib
import hmac
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from loguru import logger

from damselfly.core import ids
from damselfly.core.errors import BackendError, DamselflyError, InvalidArgument, PermissionDenied, StorageError
from damselfly.core.piece import Layout
from damselfly.core.task import TaskState
from damselfly.daemon.download import DownloadRequest
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started
from damselfly.oci.distribution import registry_scheme
from damselfly.security import tls
from damselfly.security.admission import Origin
from damselfly.security.policy import SourcePolicy, policy_connector, refusal_in

if TYPE_CHECKING:
    from damselfly.config import ProxyConfig
    from damselfly.daemon.daemon import Daemon

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_REGISTRY = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")  # host[:port]
CREDENTIAL_HEADERS = ("authorization", "cookie")  # what makes a pull "with credentials"
UPSTREAM_SCHEMES = ("http", "https")
HEALTH_PATHS = ("/healthy", "/server/ping")
MAX_HEAD = 65536  # bytes of request line and headers a client may send
CHUNK = 1 << 20


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as (start, length) within ``size``; None if unsatisfiable."""
    m = _RANGE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        raise InvalidArgument(f"unsupported Range {value!r} (one bytes=a-b range is)")
    first, last = m.group(1), m.group(2)
    if not first:
        n = int(last)
        if n == 0:
            return None
        start = max(size - n, 0)
        return start, size - start
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end - start + 1


class Proxy:
    def __init__(self, daemon: Daemon, config: ProxyConfig):
        self.d = daemon
        self.cfg = config
        self.rules = [re.compile(r) for r in config.rules]
        self.policy = SourcePolicy.from_config(daemon.settings.security.sources)
        self.header_timeout = daemon.settings.security.limits.header_timeout
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._allowed: dict[tuple[str, str, str], float] = {}  # (registry, repo, credentials) -> until
        # aiohttp closes a kept-alive connection whose next request has not fully arrived
        # header_timeout seconds after the last response: the header timeout of every request
        # after the first (the first is _Sniffer's).
        self._web = web.Server(self._handle, access_log=None, keepalive_timeout=self.header_timeout)
        self._tunnels: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        tls_cfg = self.d.settings.security.tls
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
            return _error(403 if isinstance(exc, PermissionDenied) else 400, str(exc), "proxy")
        try:
            if self.wants_p2p(request, url):
                return await self._p2p(request, url)
            return await self._pass_through(request, url)
        except ConnectionResetError:
            raise
        except DamselflyError as exc:
            return _error_of(exc)

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
                return _error_of(denied)
            return _error(502, f"upstream {redact(url)} failed: {exc}", "backend")

    # -- through the swarm ---------------------------------------------------------------

    async def _authorized(
        self, request: web.BaseRequest, url: str, blob: ids.BlobPath | None
    ) -> web.StreamResponse | None:
        """None when the client may have this registry blob; else the registry's refusal, to relay.

        The registry asked is the one in ``url``: the one a credentialed blob's task is bound to.
        """
        if blob is None:
            return None
        registry = urlsplit(url).netloc.lower()
        credentials = credentials_of(request.headers)
        key = (registry, blob.repository, hashlib.sha256(repr(credentials).encode()).hexdigest())
        if self._allowed.get(key, 0) > time.monotonic():
            return None
        assert self._session is not None
        try:
            async with self._session.head(
                url, headers=credentials, allow_redirects=True, max_redirects=self.policy.max_redirects
            ) as r:
                if r.status < 400:
                    self._allowed[key] = time.monotonic() + self.cfg.auth_cache_ttl
                    return None
                refusal = web.Response(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        refusal.headers.add(k, v)
                refusal.headers["X-Dragonfly-Error-Type"] = "backend"
                return refusal
        except (aiohttp.ClientError, PermissionDenied) as exc:
            if denied := refusal_in(exc):
                return _error_of(denied)
            return _error(502, f"cannot check access to {redact(url)}: {exc}", "backend")

    def _download_request(self, request: web.BaseRequest, url: str, blob: ids.BlobPath | None) -> DownloadRequest:
        h = request.headers
        try:
            piece_length = int(h.get("X-Dragonfly-Piece-Length", "0") or 0)
            priority = int(h.get("X-Dragonfly-Priority", "0") or 0)
        except ValueError as exc:
            raise InvalidArgument(f"bad X-Dragonfly header: {exc}") from None
        filtered = [p.strip() for p in h.get("X-Dragonfly-Filtered-Query-Params", "").split(",") if p.strip()]
        forwarded: dict[str, str] = {}
        for k, v in h.items():
            if k.lower() in HOP_BY_HOP or k.lower().startswith("x-dragonfly-") or k.lower() == "range":
                continue
            forwarded[k] = f"{forwarded[k]}, {v}" if k in forwarded else v
        req = DownloadRequest(
            url=url,
            tag=h.get("X-Dragonfly-Tag", ""),
            application=h.get("X-Dragonfly-Application", ""),
            priority=priority,
            filtered_query_params=filtered,
            request_header=forwarded,  # the client's credentials with it, for this download only
            piece_length=piece_length,
            use_blob_digest=blob is not None,  # only a path parse_blob_path accepts is a blob task
        )
        if blob is not None and credentials_of(h):
            # A pull with credentials: its blob is a task of (registry, repository, digest), so
            # it is found only by a pull that registry authorised for that repository (the
            # check above asks the registry in this URL). An anonymous pull keeps Dragonfly's
            # digest-only id, shared with upstream peers and across registries: a registry
            # gave the blob to a client without credentials, so its bytes are public, and a
            # task only anonymous pulls fill holds nothing else. A registry that answers yes to
            # everything reaches that public task only, never a credentialed pull's.
            req.content_for_calculating_task_id = ids.bound_blob_content(*urlsplit(url)[:2], blob)
        return req

    async def _p2p(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        blob = ids.parse_blob_url(url)  # the one parser: credential check and task id alike
        refusal = await self._authorized(request, url, blob)
        if refusal is not None:
            return refusal
        req = self._download_request(request, url, blob)
        range_header = request.headers.get("Range", "")
        task = self.d.storage.get(req.task_id())
        finished_before = task is not None and task.state is TaskState.SUCCEEDED
        if range_header:
            size = await self._content_length(req, task)
            wanted = parse_range(range_header, size)
            if wanted is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            req.range = wanted
        # a whole blob is hashed as it is sent (a range cannot be checked against the digest)
        check = _BlobCheck(blob) if blob is not None and req.range is None else None
        rt = await self.d.start_download(req, origin=Origin.PROXY)
        self.d.gc.touch(rt.task_id)
        resp: web.StreamResponse | None = None
        start, end = 0, -1
        layout: Layout | None = None
        landed: set[int] = set()
        next_number = 0
        async for event in rt.follow():
            if isinstance(event, Started):
                size = event.content_length
                start, length = req.range if req.range is not None else (0, size)
                end = start + length
                layout = Layout(size, event.piece_length)
                numbers = layout.numbers_for_range(start, length) if length else range(0)
                next_number = numbers.start if numbers else 0
                resp = web.StreamResponse(status=206 if req.range is not None else 200)
                resp.content_length = length
                resp.headers["Content-Type"] = "application/octet-stream"
                resp.headers["Accept-Ranges"] = "bytes"
                if req.range is not None:
                    resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
                if blob is not None:
                    resp.headers["Docker-Content-Digest"] = blob.digest
                resp.headers["X-Dragonfly-Task-ID"] = rt.task_id
                resp.headers["X-Dragonfly-Task-Download-Finished"] = "true" if finished_before else "false"
                await resp.prepare(request)
            elif isinstance(event, PieceEvent):
                landed.add(event.record.number)
                assert resp is not None
                assert layout is not None
                while next_number in landed:
                    span = layout.span(next_number)
                    lo, hi = max(span.offset, start), min(span.end, end)
                    if lo < hi:
                        if check is not None:  # hashed before it is sent: a bad last piece never leaves
                            await self._hash_piece(request, url, rt.task_id, next_number, check)
                            if hi == end and not check.matches():
                                _break_off(request, check.mismatch(redact(url), rt.task_id))
                        part = range(lo - span.offset, hi - span.offset)
                        await self._send_piece(request, resp, url, rt.task_id, next_number, part)
                    next_number += 1
            elif isinstance(event, Finished):
                if check is not None and not check.matches():  # an empty blob, or pieces never sent
                    why = check.mismatch(redact(url), rt.task_id)
                    if resp is not None:
                        _break_off(request, why)
                    logger.error("proxy: {}", why)
                    return _error(502, why, "backend")
                if resp is None:  # an empty range or content: headers only
                    return web.Response(status=200, headers={"X-Dragonfly-Task-ID": rt.task_id})
                await resp.write_eof()
                return resp
            elif isinstance(event, Failed):
                if resp is not None and resp.prepared:  # the client sees a cut body and retries
                    _break_off(request, f"{redact(url)} failed mid-response: {event.error}")
                return _error_of(event.error)
        raise ConnectionResetError("download ended without a result")

    async def _hash_piece(
        self, request: web.BaseRequest, url: str, task_id: str, number: int, check: _BlobCheck
    ) -> None:
        task = self.d.storage.get(task_id)
        try:
            if task is None:
                raise StorageError(f"task {task_id[:12]} is gone from storage")
            span = task.layout.span(number)
            async for chunk in self.d.storage.read_range(task_id, span.offset, span.length):
                check.update(chunk)
        except (DamselflyError, OSError) as exc:  # deleted under us (a failed digest check, GC)
            _break_off(request, f"{redact(url)}: cannot read piece {number} of task {task_id[:12]}: {exc}")

    async def _send_piece(
        self, request: web.BaseRequest, resp: web.StreamResponse, url: str, task_id: str, number: int, span: range
    ) -> None:
        """Bytes ``span`` of piece ``number``; a piece that cannot be read breaks the response off."""
        try:
            await self._write_piece(request, resp, task_id, number, span.start, len(span))
        except ConnectionError:
            raise  # the client went away
        except (DamselflyError, OSError) as exc:  # deleted under us (a failed digest check, GC)
            _break_off(request, f"{redact(url)}: cannot send piece {number} of task {task_id[:12]}: {exc}")

    async def _write_piece(
        self, request: web.BaseRequest, resp: web.StreamResponse, task_id: str, number: int, skip: int, length: int
    ) -> None:
        """``length`` bytes of piece ``number`` from ``skip`` on: sendfile(2) when the storage keeps it in a file.

        This is what aiohttp's own FileResponse does: the headers are already queued on the
        transport, and ``loop.sendfile`` waits for them to be written before it starts.
        """
        region = self.d.storage.piece_region(task_id, number)
        transport = request.transport
        if region is not None and transport is not None and not transport.is_closing():
            try:
                with open(region.path, "rb") as f:
                    await asyncio.get_running_loop().sendfile(transport, f, region.offset + skip, length)
                return
            except NotImplementedError:
                pass  # a transport without sendfile (TLS): the plain path below
        task = self.d.storage.get(task_id)
        if task is None:
            raise StorageError(f"task {task_id[:12]} is gone from storage")
        offset = task.layout.span(number).offset + skip
        async for chunk in self.d.storage.read_range(task_id, offset, length):
            await resp.write(chunk)

    async def _content_length(self, req: DownloadRequest, task: Any) -> int:
        if task is not None and task.known_length:
            return int(task.content_length)
        remote = await self.d.schedulers.stat_task(self.d.host_id, req.task_id())
        if remote is not None and remote.content_length > 0:
            return int(remote.content_length)
        return await self._stat(req.url, req.request_header)

    async def _stat(self, url: str, headers: dict[str, str]) -> int:
        """The upstream's content length, asked through the proxy's own (policy-checked) session:
        a HEAD, else the first byte's ``Content-Range``."""
        assert self._session is not None
        try:
            async with self._session.head(
                url, headers=headers, allow_redirects=True, max_redirects=self.policy.max_redirects
            ) as r:
                if r.status < 400 and r.content_length is not None:
                    return int(r.content_length)
                if r.status >= 400 and r.status not in (405, 501):
                    raise BackendError(f"origin answered {r.status} for HEAD {redact(url)}", status_code=r.status)
            async with self._session.get(
                url, headers={**headers, "Range": "bytes=0-0"}, max_redirects=self.policy.max_redirects
            ) as r:
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if r.status == 206 and total.isdigit():
                    return int(total)
                if r.status == 200 and r.content_length is not None:
                    return int(r.content_length)
        except (aiohttp.ClientError, PermissionDenied) as exc:
            if denied := refusal_in(exc):
                raise denied from None
            raise BackendError(f"cannot reach origin for {redact(url)}: {exc}") from None
        raise BackendError(f"origin gives no content length for {redact(url)}")

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
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
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
    if not _REGISTRY.match(netloc):
        raise InvalidArgument(f"{where}: {value[:64]!r} is not http(s)://HOST[:PORT]")
    return scheme, netloc


def credentials_of(headers: Any) -> list[tuple[str, str]]:
    """The client's ``Authorization`` and ``Cookie`` headers: they decide whose pull it is."""
    return [(k, v) for k, v in headers.items() if k.lower() in CREDENTIAL_HEADERS]


def redact(url: str) -> str:
    """``url`` fit for a log line: no user info, no query (signatures and tokens live there)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<bad url>"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path, "", ""))


class _BlobCheck:
    """The digest of a whole blob, as its bytes are sent."""

    def __init__(self, blob: ids.BlobPath):
        self.blob = blob
        self.hash = hashlib.new(blob.algorithm)
        self.sent = 0

    def update(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.sent += len(chunk)

    def matches(self) -> bool:
        return hmac.compare_digest(self.hash.hexdigest(), self.blob.hex)

    def mismatch(self, url: str, task_id: str) -> str:
        got = f"{self.blob.algorithm}:{self.hash.hexdigest()}"
        return f"blob {url} (task {task_id[:12]}) is {got} after {self.sent} bytes, not {self.blob.digest}"


def _break_off(request: web.BaseRequest, why: str) -> None:
    """End a response that is under way so that the client sees an error, not a clean end."""
    logger.error("proxy: {}: response broken off", why)
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError(why)


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={"X-Dragonfly-Error-Type": error_type})


def _error_of(exc: BaseException) -> web.Response:
    if isinstance(exc, PermissionDenied):
        return _error(403, str(exc), "proxy")
    status = getattr(exc, "status_code", 0) or (400 if isinstance(exc, InvalidArgument) else 502)
    return _error(status, str(exc), getattr(exc, "error_type", "dfdaemon"))


def _auth_required(why: str) -> web.Response:
    resp = _error(407, why, "proxy")
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
