"""``hf://`` origins: files of Hugging Face model, dataset and space repositories.

    hf://owner/repo/path/to/file            a model repository
    hf://datasets/owner/repo/path           a dataset (``spaces/`` likewise)
    hf://owner/repo@v1.0/path               a revision in the url (else ``revision``)

A file is read from the hub's resolve URL,
``{base_url}/[datasets/]owner/repo/resolve/{revision}/{path}``, with ranged GETs
and the hub's redirects followed (large files live on a CDN); a private or gated
repository needs ``token`` (dfget's ``--hf-token``), sent as a Bearer token. A
directory is listed through ``/api/{models|datasets|spaces}/owner/repo/tree/...``,
so ``damselfly get -r hf://owner/repo/ -O DIR`` fetches a whole snapshot. The
revision is part of the task id, so two revisions of one path are two tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote, urlsplit

import aiohttp
from pydantic import BaseModel

from damselfly.contracts import SourceEntry, SourceInfo
from damselfly.core.errors import BackendError, InvalidArgument
from damselfly.hookspecs import hookimpl
from damselfly.plugins.source.http import HttpSource, shown
from damselfly.plugins.source.options import HfConfig, credentials_of, endpoints_of

if TYPE_CHECKING:
    from damselfly.contracts import Registry, Source


REPO_TYPES = {"datasets": "datasets", "spaces": "spaces", "models": "models"}


@dataclass(frozen=True)
class HfPath:
    repo_type: str  # models, datasets or spaces
    repo: str  # owner/name
    revision: str
    path: str  # inside the repository; "" for its root
    pinned: bool = False  # the url named the revision (``@rev``)

    @classmethod
    def parse(cls, url: str, default_revision: str) -> HfPath:
        parts = urlsplit(url)
        if parts.scheme != "hf":
            raise InvalidArgument(f"not an hf:// url: {shown(url)!r}")
        bits = [b for b in (parts.netloc + parts.path).split("/") if b]
        repo_type = "models"
        if bits and bits[0] in REPO_TYPES:
            repo_type = REPO_TYPES[bits.pop(0)]
        if len(bits) < 2:
            raise InvalidArgument(f"hf url {shown(url)!r} names no repository (hf://[datasets/]owner/repo/path)")
        owner, name = bits[0], bits[1]
        revision = default_revision
        pinned = "@" in name
        if pinned:
            name, _, revision = name.partition("@")
            if not revision:
                raise InvalidArgument(f"hf url {shown(url)!r} has an empty revision after '@'")
        return cls(repo_type, f"{owner}/{name}", revision, "/".join(bits[2:]), pinned)

    def resolve_url(self, base: str) -> str:
        prefix = "" if self.repo_type == "models" else f"{self.repo_type}/"
        return f"{base.rstrip('/')}/{prefix}{self.repo}/resolve/{quote(self.revision, safe='')}/{quote(self.path)}"

    def tree_url(self, base: str) -> str:
        tail = f"/{quote(self.path)}" if self.path else ""
        return f"{base.rstrip('/')}/api/{self.repo_type}/{self.repo}/tree/{quote(self.revision, safe='')}{tail}"

    def url_of(self, path: str) -> str:
        prefix = "" if self.repo_type == "models" else f"{self.repo_type}/"
        at = f"@{self.revision}" if self.pinned else ""  # else the same revision option names it again
        return f"hf://{prefix}{self.repo}{at}/{path}"


class HfSource(HttpSource):
    name: ClassVar[str] = "hf"
    schemes: ClassVar[tuple[str, ...]] = ("hf",)
    request_field: ClassVar[str] = HfConfig.message
    # the node's token never goes with a request from the network, nor to a hub a request names
    credential_fields: ClassVar[frozenset[str]] = credentials_of(HfConfig)
    endpoint_fields: ClassVar[frozenset[str]] = endpoints_of(HfConfig)
    Config: ClassVar[type[BaseModel]] = HfConfig
    options: HfConfig

    def _target(self, url: str, headers: dict[str, str]) -> tuple[HfPath, str, dict[str, str]]:
        where = HfPath.parse(url, self.options.revision)
        if not where.path:
            raise BackendError(
                f"{shown(url)} names a repository, not a file (use a recursive download)", status_code=400
            )
        hdrs = dict(headers)
        if self.options.token:
            hdrs["Authorization"] = f"Bearer {self.options.token}"
        return where, where.resolve_url(self.options.base_url), hdrs

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        _, resolved, hdrs = self._target(url, headers)
        return await super().stat(resolved, hdrs)

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        _, resolved, hdrs = self._target(url, headers)
        async for chunk in super().read(resolved, offset, length, hdrs):
            yield chunk

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        where = HfPath.parse(url, self.options.revision)
        hdrs = dict(headers)
        if self.options.token:
            hdrs["Authorization"] = f"Bearer {self.options.token}"
        next_url: str | None = where.tree_url(self.options.base_url) + "?recursive=true"
        entries: list[SourceEntry] = []
        try:
            while next_url:
                async with self._client().get(next_url, headers=self._headers(hdrs), **self._follow()) as resp:
                    if resp.status >= 400:
                        raise BackendError(
                            f"hub answered {resp.status} {resp.reason} listing {shown(url)}", status_code=resp.status
                        )
                    for item in await resp.json(content_type=None):
                        is_dir = item.get("type") == "directory"
                        entries.append(SourceEntry(where.url_of(item["path"]), int(item.get("size") or 0), is_dir))
                    next_url = resp.links.get("next", {}).get("url")  # type: ignore[assignment]
                    next_url = str(next_url) if next_url else None
        except aiohttp.ClientError as exc:
            raise self.client_error(exc, f"cannot list {shown(url)}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"the hub's listing of {shown(url)} is malformed: {exc}") from None
        return sorted(entries, key=lambda e: e.url)


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(HfSource)
