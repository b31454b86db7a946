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

Private images stay private: before a registry blob is served from the swarm, the
client's own credentials (its ``Authorization``, or none) are checked against the
registry with a HEAD of that blob, remembered ``auth_cache_ttl`` seconds per
repository and credentials. A client the registry refuses gets the registry's
answer (401 and its ``WWW-Authenticate``), even when the blob is on this disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from loguru import logger

from damselfly.core.errors import BackendError, DamselflyError, InvalidArgument
from damselfly.core.piece import Layout
from damselfly.core.task import TaskState
from damselfly.daemon.download import DownloadRequest
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started
from damselfly.oci import registry_scheme

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
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
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
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._allowed: dict[tuple[str, str, str], float] = {}  # (registry, repo, credentials) -> until
        self._web = web.Server(self._handle, access_log=None)
        self._tunnels: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Sniffer(self), host, self.cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout, auto_decompress=False, trust_env=False, connector=aiohttp.TCPConnector(limit=256)
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

    # -- routing -------------------------------------------------------------------------

    def upstream_url(self, request: web.BaseRequest) -> str:
        target = request._message.path  # the request-target as sent
        if target.startswith(("http://", "https://")):
            return target  # HTTP-proxy mode
        registry = request.headers.get("X-Dragonfly-Registry", "").strip()
        query = [(k, v) for k, v in parse_qsl(request.query_string, keep_blank_values=True)]
        ns = next((v for k, v in query if k == "ns"), "")
        if not registry and ns:
            registry = f"{registry_scheme(ns, self.cfg.insecure_registries)}://{ns}"
        registry = registry or self.cfg.registry_mirror
        if not registry:
            raise InvalidArgument("no upstream: send X-Dragonfly-Registry or ?ns=, or set proxy.registry_mirror")
        if "://" not in registry:
            registry = "https://" + registry
        base = urlsplit(registry)
        rest = [(k, v) for k, v in query if k != "ns"]
        return urlunsplit((base.scheme, base.netloc, request.path, urlencode(rest), ""))

    def wants_p2p(self, request: web.BaseRequest, url: str) -> bool:
        if request.method != "GET":
            return False
        if request.headers.get("X-Dragonfly-Use-P2P", "").lower() == "true":
            return True
        return any(r.search(url) for r in self.rules)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path in ("/healthy", "/server/ping") and not request._message.path.startswith("http"):
            return web.Response(text="OK")
        try:
            url = self.upstream_url(request)
        except InvalidArgument as exc:
            return _error(400, str(exc), "proxy")
        try:
            if self.wants_p2p(request, url):
                return await self._p2p(request, url)
            return await self._pass_through(request, url)
        except ConnectionResetError:
            raise
        except DamselflyError as exc:
            status = getattr(exc, "status_code", 0) or (400 if isinstance(exc, InvalidArgument) else 502)
            return _error(status, str(exc), getattr(exc, "error_type", "dfdaemon"))

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
        except aiohttp.ClientError as exc:
            return _error(502, f"upstream {url} failed: {exc}", "backend")

    # -- through the swarm ---------------------------------------------------------------

    async def _authorized(self, request: web.BaseRequest, url: str) -> web.StreamResponse | None:
        """None when the client may have this registry blob; else the registry's refusal, to relay."""
        parts = urlsplit(url)
        m = _BLOB.match(parts.path)
        if m is None:
            return None
        credentials = request.headers.get("Authorization", "")
        key = (parts.netloc, m["repo"], hashlib.sha256(credentials.encode()).hexdigest())
        if self._allowed.get(key, 0) > time.monotonic():
            return None
        assert self._session is not None
        headers = {"Authorization": credentials} if credentials else {}
        try:
            async with self._session.head(url, headers=headers, allow_redirects=True) as r:
                if r.status < 400:
                    self._allowed[key] = time.monotonic() + self.cfg.auth_cache_ttl
                    return None
                refusal = web.Response(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        refusal.headers.add(k, v)
                refusal.headers["X-Dragonfly-Error-Type"] = "backend"
                return refusal
        except aiohttp.ClientError as exc:
            return _error(502, f"cannot check access to {url}: {exc}", "backend")

    def _download_request(self, request: web.BaseRequest, url: str) -> DownloadRequest:
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
        return DownloadRequest(
            url=url,
            tag=h.get("X-Dragonfly-Tag", ""),
            application=h.get("X-Dragonfly-Application", ""),
            priority=priority,
            filtered_query_params=filtered,
            request_header=forwarded,
            piece_length=piece_length,
            use_blob_digest=True,
        )

    async def _p2p(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        refusal = await self._authorized(request, url)
        if refusal is not None:
            return refusal
        req = self._download_request(request, url)
        range_header = request.headers.get("Range", "")
        task = self.d.storage.get(req.task_id())
        finished_before = task is not None and task.state is TaskState.SUCCEEDED
        if range_header:
            size = await self._content_length(req, task)
            wanted = parse_range(range_header, size)
            if wanted is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            req.range = wanted
        rt = await self.d.start_download(req)
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
                digest = urlsplit(url).path.rsplit("/", 1)[-1]
                if ":" in digest:
                    resp.headers["Docker-Content-Digest"] = digest
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
                        await self._send_piece(request, resp, rt.task_id, next_number, lo - span.offset, hi - lo)
                    next_number += 1
            elif isinstance(event, Finished):
                if resp is None:  # an empty range or content: headers only
                    resp = web.Response(status=200, headers={"X-Dragonfly-Task-ID": rt.task_id})
                    return resp
                await resp.write_eof()
                return resp
            elif isinstance(event, Failed):
                if resp is not None and resp.prepared:
                    logger.warning("proxy: {} failed mid-response: {}", url, event.error)
                    raise ConnectionResetError(str(event.error))  # the client sees a cut body and retries
                exc = event.error
                status = getattr(exc, "status_code", 0) or 502
                return _error(status, str(exc), getattr(exc, "error_type", "dfdaemon"))
        raise ConnectionResetError("download ended without a result")

    async def _send_piece(
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
        assert task is not None
        offset = task.layout.span(number).offset + skip
        async for chunk in self.d.storage.read_range(task_id, offset, length):
            await resp.write(chunk)

    async def _content_length(self, req: DownloadRequest, task: Any) -> int:
        if task is not None and task.known_length:
            return int(task.content_length)
        remote = await self.d.schedulers.stat_task(self.d.host_id, req.task_id())
        if remote is not None and remote.content_length > 0:
            return int(remote.content_length)
        source = self.d.plugins.make_source(req.url, req.source_options)
        try:
            info = await source.stat(req.url, req.request_header)
        finally:
            await source.close()
        if info.content_length < 0:
            raise BackendError(f"origin gives no content length for {req.url}")
        return info.content_length

    # -- CONNECT -------------------------------------------------------------------------

    async def tunnel(self, sniffer: _Sniffer, authority: str) -> None:
        transport = sniffer.transport
        assert transport is not None
        host, _, port = authority.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), self.cfg.connect_timeout
            )
        except (OSError, ValueError, TimeoutError) as exc:
            body = f"cannot reach {authority}: {exc}\n".encode()
            head = f"HTTP/1.1 502 Bad Gateway\r\nX-Dragonfly-Error-Type: proxy\r\nContent-Length: {len(body)}\r\n\r\n"
            transport.write(head.encode() + body)
            transport.close()
            return
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sniffer.upstream = writer
        if sniffer.buf:
            writer.write(sniffer.buf)
            sniffer.buf = b""
        try:
            while data := await reader.read(CHUNK):
                transport.write(data)
        finally:
            writer.close()
            transport.close()


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={"X-Dragonfly-Error-Type": error_type})


class _Sniffer(asyncio.Protocol):
    """Looks at a connection's first line: CONNECT is tunnelled here, anything else goes to aiohttp."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.tunnelling = False
        self.upstream: asyncio.StreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tunnelling:
            if self.upstream is not None:
                self.upstream.write(data)
            else:
                self.buf += data  # the upstream connection is still being made
            return
        self.buf += data
        if self.buf[:1] == b"\x16":  # a TLS ClientHello on this plain-HTTP port: refuse at once, so the
            self.transport.close()  # client falls back to HTTP now rather than after its TLS timeout
            return
        if not self.buf.startswith(b"CONNECT "):
            if b"\r\n" not in self.buf and len(self.buf) < 8192:
                return  # not even a request line yet
        elif b"\r\n\r\n" in self.buf or len(self.buf) >= 65536:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            first = head.split(b"\r\n", 1)[0].split()
            if len(first) == 3:
                self.tunnelling = True
                self.buf = rest
                task = asyncio.get_running_loop().create_task(self.proxy.tunnel(self, first[1].decode("latin-1")))
                self.proxy._tunnels.add(task)
                task.add_done_callback(self.proxy._tunnels.discard)
                return
        else:
            return  # a CONNECT whose headers have not all arrived
        handler = self.proxy._web()  # aiohttp's protocol takes over this connection from here
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        handler.data_received(self.buf)
        self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()
