"""The source conformance kit: the cases every source plugin passes.

A source package subclasses ``SourceConformance`` in its tests and provides two
fixtures: ``source``, an instance of its plugin (the kit closes it), and ``origin``, a
``Served`` that says what the origin serves. The kit's ``content`` fixture holds
bytes an origin may serve (3 MiB and a few, pseudo-random); an origin whose content is
fixed (a generated one) describes its own:

    from damselfly.testing.source import Served, SourceConformance

    class TestMySource(SourceConformance):
        @pytest.fixture
        def source(self):
            return MySource()

        @pytest.fixture
        def origin(self, tmp_path, content):
            (tmp_path / "blob").write_bytes(content)
            return Served(url=f"my://{tmp_path}/blob", content=content, missing_url=f"my://{tmp_path}/nope")

Cases: ``stat`` (the length, range support); a whole read, ranged reads (the first and
the last byte, across 64 KiB and 1 MiB boundaries), each yielding exactly the bytes
asked for, never more, whatever ``Range`` header the caller passes; an empty read;
concurrent reads on one source; a reader that stops early, after which the source still
reads; a missing object, a one-line ``BackendError`` from ``stat`` and ``read`` (with
the origin's status, where ``missing_status`` gives it); listing (an entry for the
object, with its length) where ``listing_url`` is given, else a clear refusal; the
caller's headers reaching the origin on ``stat`` and ``read``, where the origin can
tell (``received_headers``); and the class as the plugin manager reads it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from damselfly.contracts import Source
from damselfly.core.errors import BackendError, DamselflyError

MiB = 1 << 20
CONTENT = random.Random(27).randbytes(3 * MiB + 5)
HEADER = "X-Damselfly-Conformance"


@dataclass(frozen=True)
class Served:
    """What the origin under test serves, for the kit.

    ``url``: an object whose bytes are ``content``; ``missing_url``: where the origin has
    no object (``missing_status``: the status its error carries, 0 to leave it unchecked);
    ``supports_range``: what ``stat`` says of ``url``; ``listing_url``: a directory the
    source lists, holding ``url`` (None: the source does not list); ``received_headers``:
    the headers of each request the origin got so far, in order (None: it cannot tell).
    """

    url: str
    content: bytes
    missing_url: str
    missing_status: int = 0
    supports_range: bool = True
    listing_url: str | None = None
    received_headers: Callable[[], list[dict[str, str]]] | None = None


async def read_all(source: Source, url: str, offset: int, length: int, headers: dict[str, str] | None = None) -> bytes:
    chunks = [chunk async for chunk in source.read(url, offset, length, headers or {})]
    assert all(isinstance(c, bytes | bytearray | memoryview) for c in chunks), "a chunk that is not bytes"
    return b"".join(chunks)


class SourceConformance:
    @pytest.fixture
    def content(self) -> bytes:
        """Bytes an origin may serve for the kit (an origin with fixed content ignores them)."""
        return CONTENT

    @pytest.fixture
    def source(self) -> Source:
        raise NotImplementedError("provide `source`: an instance of the plugin")

    @pytest.fixture
    def origin(self) -> Served:
        raise NotImplementedError("provide `origin`: a Served saying what the origin serves")

    @pytest.fixture
    async def src(self, source: Source) -> AsyncIterator[Source]:
        yield source
        await source.close()

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """(offset, length) pairs to read: the first and last bytes, across chunk boundaries."""
        candidates = [(0, 1), (1, 1000), (size - 1, 1), (size - 100, 100), (65535, 131074), (MiB - 3, MiB + 6)]
        return [(o, n) for o, n in candidates if o >= 0 and o + n <= size]

    async def test_stat_says_the_length_and_range_support(self, src: Source, origin: Served) -> None:
        info = await src.stat(origin.url, {})
        assert info.content_length == len(origin.content)
        assert info.supports_range is origin.supports_range
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.headers.items())

    async def test_a_whole_read(self, src: Source, origin: Served) -> None:
        assert await read_all(src, origin.url, 0, len(origin.content)) == origin.content

    async def test_ranged_reads_yield_exactly_what_is_asked(self, src: Source, origin: Served) -> None:
        if not origin.supports_range:
            pytest.skip("the origin does not serve ranges")
        for offset, length in self.ranges(len(origin.content)):
            got = await read_all(src, origin.url, offset, length)
            assert got == origin.content[offset : offset + length], f"read({offset}, {length})"

    async def test_a_callers_range_header_never_changes_what_is_read(self, src: Source, origin: Served) -> None:
        if not origin.supports_range:
            pytest.skip("the origin does not serve ranges")
        got = await read_all(src, origin.url, 10, 20, {"Range": "bytes=0-0", "range": "bytes=5-"})
        assert got == origin.content[10:30]

    async def test_an_empty_read_yields_nothing(self, src: Source, origin: Served) -> None:
        assert await read_all(src, origin.url, 0, 0) == b""

    async def test_concurrent_reads_on_one_source(self, src: Source, origin: Served) -> None:
        size = len(origin.content)
        parts = [(i * size // 8, size // 8) for i in range(8)] if origin.supports_range else [(0, size)] * 4
        got = await asyncio.gather(*(read_all(src, origin.url, o, n) for o, n in parts))
        assert got == [origin.content[o : o + n] for o, n in parts]

    async def test_a_reader_that_stops_early_leaves_the_source_usable(self, src: Source, origin: Served) -> None:
        reader = src.read(origin.url, 0, len(origin.content), {})
        first = await reader.__anext__()
        assert first
        assert origin.content.startswith(first)
        if isinstance(reader, AsyncGenerator):  # as ``async def read(...): yield`` makes it
            await reader.aclose()
        assert await read_all(src, origin.url, 0, len(origin.content)) == origin.content

    async def test_a_missing_object_is_a_backend_error(self, src: Source, origin: Served) -> None:
        with pytest.raises(BackendError) as stat_error:
            await src.stat(origin.missing_url, {})
        with pytest.raises(BackendError) as read_error:
            await read_all(src, origin.missing_url, 0, 10)
        for err in (stat_error.value, read_error.value):
            assert "\n" not in str(err), "an error message is one line"
            if origin.missing_status:
                assert err.status_code == origin.missing_status

    async def test_listing(self, src: Source, origin: Served) -> None:
        """Where the source lists, an entry for the object with its length; else a clear error."""
        if origin.listing_url is None:
            with pytest.raises(DamselflyError):
                await src.list(origin.url, {})
            return
        entries = await src.list(origin.listing_url, {})
        mine = [e for e in entries if e.url == origin.url]
        assert len(mine) == 1, f"{origin.url} not among {[e.url for e in entries][:10]}"
        assert (mine[0].content_length, mine[0].is_dir) == (len(origin.content), False)

    async def test_the_callers_headers_reach_the_origin(self, src: Source, origin: Served) -> None:
        if origin.received_headers is None:
            pytest.skip("the origin cannot tell which headers it got")
        await src.stat(origin.url, {HEADER: "stat"})
        await read_all(src, origin.url, 0, 10, {HEADER: "read"})
        seen = [{k.lower(): v for k, v in h.items()} for h in origin.received_headers()]
        sent = [h[HEADER.lower()] for h in seen if HEADER.lower() in h]
        assert sorted(set(sent)) == ["read", "stat"], f"the origin got {HEADER}: {sent}"

    async def test_its_class_says_what_the_plugin_manager_reads(self, src: Source, origin: Served) -> None:
        """``name``, lowercase ``schemes`` that take the origin's url, and options from config
        (``Config`` with no options)."""
        cls = type(src)
        assert isinstance(cls.name, str)
        assert cls.name
        assert all(isinstance(s, str) and s == s.lower() for s in cls.schemes)
        scheme = urlsplit(origin.url).scheme
        assert scheme in cls.schemes or cls.handles(scheme), f"{cls.__name__} does not take {scheme}:// urls"
        assert cls.parse_options({}, f"sources.{cls.name}") is not None
