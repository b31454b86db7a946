"""An example third-party plugin package for damselfly.

``hello://N`` is a source of N bytes of a repeating greeting, so a swarm can be
tried without any origin server; ``idle-first`` is a scheduling strategy that
gives a child the parents with the fewest uploads in flight. Installed, the package
is found through the ``damselfly`` entry-point group, exactly as the built-in
plugins are registered; its tests run damselfly's source and strategy kits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar
from urllib.parse import urlsplit

from damselfly import hookimpl
from damselfly.contracts import Candidate, Registry, Source, SourceInfo, Strategy
from damselfly.core.errors import BackendError
from damselfly.core.task import Task

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


class IdleFirstStrategy(Strategy):
    """Parents with the fewest pieces uploading first, then those with the most free upload
    bandwidth, then those holding the most pieces; ties keep the scheduler's order."""

    name: ClassVar[str] = "idle-first"

    def rank(self, child: Candidate, candidates: list[Candidate], task: Task) -> list[Candidate]:
        def key(c: Candidate) -> tuple[int, int, int]:
            free = max(c.host.max_tx_bandwidth - c.host.tx_bandwidth, 0)
            return (c.host.concurrent_upload_pieces, -free, -len(c.peer.finished_pieces))

        return sorted(candidates, key=key)


@hookimpl
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    registry.add(IdleFirstStrategy)
