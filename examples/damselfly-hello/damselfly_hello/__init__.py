"""An example third-party plugin package for damselfly.

``hello://N`` is a source of N bytes of a repeating greeting, so a swarm can be
tried without any origin server. Installed, it is found through the
``damselfly`` entry-point group, exactly as the built-in plugins are registered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from damselfly import hookimpl
from damselfly.contracts import Source, SourceInfo
from damselfly.core.errors import BackendError

if TYPE_CHECKING:
    from damselfly.plugin_manager import Registry


GREETING = b"hello from a damselfly plugin! "


def _size(url: str) -> int:
    host = urlsplit(url).netloc
    if not host.isdigit():
        raise BackendError(f"hello:// urls name a size in bytes, e.g. hello://1048576 (got {url!r})")
    return int(host)


class HelloSource(Source):
    name: ClassVar[str] = "hello"
    schemes: ClassVar[tuple[str, ...]] = ("hello",)

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        return SourceInfo(_size(url), True, {"Content-Type": "text/plain"})

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        end = min(offset + length, _size(url))
        while offset < end:
            n = min(65536, end - offset)
            start = offset % len(GREETING)
            reps = (start + n) // len(GREETING) + 1
            yield (GREETING * reps)[start : start + n]
            offset += n


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(HelloSource)
