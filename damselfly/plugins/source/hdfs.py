"""``hdfs://`` origins over WebHDFS, the REST API every HDFS namenode serves.

    hdfs://namenode:9870/path/to/file     (no port: ``port``, 9870 by default)

``stat`` is ``GETFILESTATUS``; a read is ``OPEN`` with ``offset`` and ``length``,
which the namenode redirects to a datanode (followed); ``list`` walks
``LISTSTATUS``. ``delegation_token`` (dfget's ``--hdfs-delegation-token``, or the
Download's ``hdfs`` message) is sent as ``delegation=``, else ``user`` as
``user.name=`` (simple authentication).

No HDFS runs where damselfly is built: this plugin is tested against
``damselfly.testing.webhdfs``, a small server speaking the same REST calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from pydantic import BaseModel

from damselfly.contracts import SourceEntry, SourceInfo
from damselfly.core.errors import BackendError, InvalidArgument
from damselfly.hookspecs import hookimpl
from damselfly.plugins.source.http import HttpSource, shown
from damselfly.plugins.source.options import HdfsConfig, credentials_of, endpoints_of

if TYPE_CHECKING:
    from damselfly.contracts import Registry, Source


CHUNK = 256 * 1024


class HdfsSource(HttpSource):
    name: ClassVar[str] = "hdfs"
    schemes: ClassVar[tuple[str, ...]] = ("hdfs",)
    request_field: ClassVar[str] = HdfsConfig.message
    # the node's token and user never go with a request from the network
    credential_fields: ClassVar[frozenset[str]] = credentials_of(HdfsConfig)
    endpoint_fields: ClassVar[frozenset[str]] = endpoints_of(HdfsConfig)
    Config: ClassVar[type[BaseModel]] = HdfsConfig
    options: HdfsConfig

    def _rest(self, url: str, op: str, **params: Any) -> tuple[str, str]:
        parts = urlsplit(url)
        if not parts.hostname:
            raise InvalidArgument(f"hdfs url {shown(url)!r} names no namenode (hdfs://host:port/path)")
        o = self.options
        query: dict[str, Any] = {"op": op, **params}
        if o.delegation_token:
            query["delegation"] = o.delegation_token
        elif o.user:
            query["user.name"] = o.user
        path = parts.path or "/"
        scheme = "https" if o.use_https else "http"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        rest = f"{scheme}://{host}:{parts.port or o.port}/webhdfs/v1{quote(path)}?{urlencode(query)}"
        return rest, path

    async def _json(self, url: str, op: str) -> dict[str, Any]:
        rest, _ = self._rest(url, op)
        try:
            async with self._client().get(rest, **self._follow()) as resp:
                body = await resp.json(content_type=None)
                if resp.status >= 400:
                    message = (body or {}).get("RemoteException", {}).get("message", resp.reason)
                    status = 404 if resp.status == 404 else (403 if resp.status in (401, 403) else resp.status)
                    raise BackendError(
                        f"namenode answered {resp.status} for {shown(url)}: {message}", status_code=status
                    )
                return body  # type: ignore[no-any-return]
        except aiohttp.ClientError as exc:
            raise self.client_error(exc, f"cannot reach the namenode for {shown(url)}") from None
        except ValueError as exc:
            raise BackendError(f"the namenode's answer for {shown(url)} is not JSON: {exc}") from None

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        status = (await self._json(url, "GETFILESTATUS")).get("FileStatus") or {}
        if status.get("type") == "DIRECTORY":
            raise BackendError(f"{shown(url)} is a directory (use a recursive download)", status_code=400)
        if "length" not in status:
            raise BackendError(f"the namenode gave no length for {shown(url)}")
        return SourceInfo(int(status["length"]), True, {"modificationTime": str(status.get("modificationTime", ""))})

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if length <= 0:
            return
        rest, _ = self._rest(url, "OPEN", offset=offset, length=length)
        try:
            async with self._client().get(rest, **self._follow()) as resp:
                if resp.status != 200:
                    raise BackendError(
                        f"reading {shown(url)} answered {resp.status} {resp.reason}", status_code=resp.status
                    )
                left = length
                async for chunk in resp.content.iter_chunked(CHUNK):
                    chunk = chunk[:left]
                    left -= len(chunk)
                    yield chunk
                    if not left:
                        break
                if left:
                    raise BackendError(f"the datanode closed {shown(url)} {left} bytes short")
        except aiohttp.ClientError as exc:
            raise self.client_error(exc, f"reading {shown(url)} from HDFS failed") from None

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        parts = urlsplit(url)
        base = f"hdfs://{parts.netloc}"
        out: list[SourceEntry] = []
        todo = [parts.path.rstrip("/") or "/"]
        while todo:
            directory = todo.pop()
            listing = await self._json(f"{base}{directory}", "LISTSTATUS")
            for st in (listing.get("FileStatuses") or {}).get("FileStatus", []):
                child = f"{directory.rstrip('/')}/{st['pathSuffix']}"
                is_dir = st.get("type") == "DIRECTORY"
                out.append(SourceEntry(f"{base}{child}", int(st.get("length", 0)), is_dir))
                if is_dir:
                    todo.append(child)
        return sorted(out, key=lambda e: e.url)


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(HdfsSource)
