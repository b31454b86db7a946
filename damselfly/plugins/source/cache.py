"""``damselfly-cache://`` urls: persistent cache tasks, whose content lives only in the swarm.

``damselfly cache import FILE`` stores a file on its peer and on replicas, under
``damselfly-cache://SHA256[?tag=..&application=..]`` (the url is also what the task
id is computed from; ``core.ids`` builds both). There is no origin to go back to: this
source says so, and a download of such a task comes from peers or not at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from damselfly.contracts import Source, SourceInfo
from damselfly.core.errors import BackendError
from damselfly.core.ids import CACHE_SCHEME
from damselfly.hookspecs import hookimpl

if TYPE_CHECKING:
    from damselfly.contracts import Registry


class CacheSource(Source):
    name: ClassVar[str] = "cache"
    schemes: ClassVar[tuple[str, ...]] = (CACHE_SCHEME,)

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        raise BackendError(f"{url} is a persistent cache task: no peer holding it could be reached", status_code=404)

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        raise BackendError(f"{url} is a persistent cache task: no peer holding it could be reached", status_code=404)
        yield b""  # pragma: no cover - makes this an async generator


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(CacheSource)
