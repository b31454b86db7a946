"""``oci://`` origins: images and blobs in an OCI distribution registry.

    oci://REGISTRY/REPO@sha256:DIGEST     a blob (a layer or a config), or a manifest by digest
    oci://REGISTRY/REPO:TAG               the image manifest of ``platform`` (an index is resolved)

``damselfly get -r oci://REGISTRY/REPO:TAG -O DIR`` lists the image's config and
layers and downloads each blob. Credentials are ``username``/``password`` (config
``sources.oci``); the registry's challenge picks Bearer tokens or Basic auth.
Registries on loopback, and those in ``insecure``, are spoken to over plain HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import SourceEntry, SourceInfo
from damselfly.hookspecs import hookimpl
from damselfly.oci.distribution import MANIFEST_TYPES, Reference, RegistryClient
from damselfly.plugins.source.http import HttpSource
from damselfly.plugins.source.options import HttpConfig

if TYPE_CHECKING:
    from damselfly.contracts import Registry, Source


class OciConfig(HttpConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    username: str = Field("", description="Registry username (empty: anonymous).")
    password: str = Field("", description="Registry password or token.")
    platform: str = Field("linux/amd64", description="Platform an image index is resolved to.")
    insecure: list[str] = Field(default_factory=list, description="host:port of registries served over plain HTTP.")


class OciSource(HttpSource):
    name: ClassVar[str] = "oci"
    schemes: ClassVar[tuple[str, ...]] = ("oci",)
    credential_fields: ClassVar[frozenset[str]] = frozenset({"username", "password"})
    Config: ClassVar[type[BaseModel]] = OciConfig
    options: OciConfig

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self._registry_client: RegistryClient | None = None

    def _registry(self) -> RegistryClient:
        client = self._registry_client
        if client is None:
            client = self._registry_client = RegistryClient(
                self._client(), self.options.username, self.options.password
            )
        return client

    async def _target(self, url: str) -> tuple[str, dict[str, str]]:
        """The registry URL that serves ``url``'s bytes, and the headers to send."""
        ref = Reference.parse(url, tuple(self.options.insecure))
        registry = self._registry()
        if ref.digest:
            return ref.blob_url(ref.digest), self._auth_headers(registry)
        resolved = await registry.resolve(ref, self.options.platform)
        return ref.manifest_url(resolved.manifest_digest or None), {
            **self._auth_headers(registry),
            "Accept": ", ".join(MANIFEST_TYPES),
        }

    @staticmethod
    def _auth_headers(registry: RegistryClient) -> dict[str, str]:
        return {"Authorization": registry.authorization} if registry.authorization else {}

    async def _challenged(self, url: str) -> tuple[str, dict[str, str]]:
        target, headers = await self._target(url)
        ref = Reference.parse(url, tuple(self.options.insecure))
        if not headers.get("Authorization"):
            # learn the registry's challenge once (anonymous registries answer 200 to the HEAD)
            try:
                async with self._client().head(target, headers=headers, **self._follow()) as r:
                    if r.status == 401 and "WWW-Authenticate" in r.headers:
                        registry = self._registry()
                        registry.authorization = await registry.answer_challenge(r.headers["WWW-Authenticate"], ref)
                        headers = {**headers, **self._auth_headers(registry)}
            except aiohttp.ClientError as exc:
                raise self.client_error(exc, f"cannot reach registry {ref.registry}") from None
        return target, headers

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        target, hdrs = await self._challenged(url)
        return await super().stat(target, {**headers, **hdrs})

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        target, hdrs = await self._challenged(url)
        async for chunk in super().read(target, offset, length, {**headers, **hdrs}):
            yield chunk

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        ref = Reference.parse(url, tuple(self.options.insecure))
        image = await self._registry().resolve(ref, self.options.platform)
        base = f"oci://{ref.registry}/{ref.repository}@"
        entries = [SourceEntry(base + image.config, 0)]
        entries += [SourceEntry(base + digest, size) for digest, size in image.layers]
        return entries


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(OciSource)
