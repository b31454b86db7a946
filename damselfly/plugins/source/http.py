"""``http`` and ``https`` origins through aiohttp: HEAD to stat, Range GETs to read.

Every connection goes through the source policy (``security.sources``): the host's
name and each address it resolves to (or the literal address) are checked where the
connector connects, so a redirect is checked like the first URL, and at most
``max_redirects`` redirects are followed. A refusal is PermissionDenied, naming the
setting that would allow it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
from pydantic import BaseModel

from damselfly.contracts import Source, SourceInfo
from damselfly.core.errors import BackendError, PermissionDenied
from damselfly.hookspecs import hookimpl
from damselfly.plugins.source.options import HttpConfig
from damselfly.rpc.wire import redact_url
from damselfly.security.admission import current_policy
from damselfly.security.policy import SourcePolicy, policy_connector, refusal_in

if TYPE_CHECKING:
    from damselfly.contracts import Registry


CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# Hop-by-hop and framing headers are ours to set, never passed on to the origin.
_DROP = {"host", "range", "content-length", "transfer-encoding", "connection", "accept-encoding"}
# URLs inside a message (an aiohttp error names its request's), and webhdfs's delegation token
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,:;)]")
_DELEGATION = re.compile(r"(?i)\b(delegation=)[^&\s'\"<>]+")


def shown(text: object) -> str:
    """``text`` (a URL, or a message naming URLs) as it may go into an error or a log: each URL
    without its user:password and its signed-URL credentials (``wire.redact_url``)."""
    out = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    return _DELEGATION.sub(r"\1REDACTED", out)


class HttpSource(Source):
    name: ClassVar[str] = "http"
    schemes: ClassVar[tuple[str, ...]] = ("http", "https")
    credential_fields: ClassVar[frozenset[str]] = frozenset()  # credentials come in the request's headers
    Config = HttpConfig
    options: HttpConfig

    def __init__(self, options: BaseModel | None = None, *, policy: SourcePolicy | None = None):
        super().__init__(options)
        self.policy = policy or current_policy()  # made for an admitted download: its policy
        self._session: aiohttp.ClientSession | None = None

    def source_policy(self) -> SourcePolicy:
        """The policy this source's connections are checked against (see ``policy_of``)."""
        self.policy = policy_of(self)
        return self.policy

    def _follow(self) -> dict[str, Any]:
        """Redirect options of a request: at most the policy's ``max_redirects``, each checked."""
        most = self.source_policy().max_redirects
        return {"allow_redirects": most > 0, "max_redirects": most + 1}  # aiohttp stops *at* its count

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.options.connect_timeout, sock_read=self.options.read_timeout
            )
            connector = policy_connector(
                self.source_policy(),
                ssl=None if self.options.verify_tls else False,
                limit=64,
                socket_factory=self._socket,
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                connector=connector,
                auto_decompress=False,
                trust_env=False,
                read_bufsize=self.options.read_buffer,
            )
        return self._session

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        if self.options.socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.options.socket_buffer)
        return sock

    @staticmethod
    def _headers(headers: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k.lower() not in _DROP}

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        hdrs = self._headers(headers)
        try:
            async with self._client().head(url, headers=hdrs, **self._follow()) as resp:
                if resp.status < 400 and resp.headers.get("Content-Length") is not None:
                    return SourceInfo(
                        int(resp.headers["Content-Length"]),
                        resp.headers.get("Accept-Ranges", "").lower() == "bytes",
                        dict(resp.headers),
                    )
                if resp.status >= 400 and resp.status not in (405, 501):
                    raise BackendError(
                        f"origin answered {resp.status} {resp.reason} for HEAD {shown(url)}",
                        status_code=resp.status,
                        headers=dict(resp.headers),
                    )
            # No length from HEAD: ask for the first byte and read Content-Range.
            async with self._client().get(url, headers={**hdrs, "Range": "bytes=0-0"}, **self._follow()) as resp:
                if resp.status == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if m and m.group(3) != "*":
                        return SourceInfo(int(m.group(3)), True, dict(resp.headers))
                if resp.status == 416:
                    return SourceInfo(0, True, dict(resp.headers))
                if resp.status == 200 and resp.headers.get("Content-Length") is not None:
                    return SourceInfo(int(resp.headers["Content-Length"]), False, dict(resp.headers))
                raise BackendError(
                    f"origin gives no content length for {shown(url)} (status {resp.status})",
                    status_code=resp.status,
                    headers=dict(resp.headers),
                )
        except aiohttp.ClientError as exc:
            raise self.client_error(exc, f"cannot reach origin for {shown(url)}") from None

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if length <= 0:
            return
        hdrs = {**self._headers(headers), "Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            async with self._client().get(url, headers=hdrs, **self._follow()) as resp:
                if resp.status == 200:
                    if offset != 0:
                        raise BackendError(f"origin ignored the Range header for {shown(url)}", status_code=200)
                elif resp.status != 206:
                    raise BackendError(
                        f"origin answered {resp.status} {resp.reason} for {shown(url)}",
                        status_code=resp.status,
                        headers=dict(resp.headers),
                    )
                left = length
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if len(chunk) > left:
                        chunk = chunk[:left]
                    left -= len(chunk)
                    yield chunk
                    if left == 0:
                        break
                if left:
                    raise BackendError(f"origin closed {shown(url)} {left} bytes short")
        except aiohttp.ClientError as exc:
            raise self.client_error(exc, f"reading {shown(url)} from origin failed") from None

    def client_error(self, exc: aiohttp.ClientError, what: str) -> PermissionDenied | BackendError:
        """aiohttp's error as ours: the policy's refusal inside it, or a BackendError saying ``what``."""
        denied = refusal_in(exc)
        if denied is not None:
            return PermissionDenied(shown(f"{what}: {denied}"))
        if isinstance(exc, aiohttp.TooManyRedirects):
            most = self.source_policy().max_redirects
            return BackendError(shown(f"{what}: more than {most} redirects (security.sources.max_redirects)"))
        return BackendError(shown(f"{what}: {exc}"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def policy_of(source: object) -> SourcePolicy:
    """The source policy a source runs under: the one it was made with (``policy``: given, or
    the admitted download's it was made for, see ``damselfly.security.admission``), else the
    running download's, else the defaults (which refuse loopback, private and link-local
    origins)."""
    from damselfly.config import SourcePolicyConfig

    policy = getattr(source, "policy", None) or current_policy()
    return policy if policy is not None else SourcePolicy.from_config(SourcePolicyConfig())


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(HttpSource)
