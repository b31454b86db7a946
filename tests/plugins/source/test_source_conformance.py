"""The source conformance kit run against the built-in ``http`` and ``file`` sources."""

import os
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from damselfly.config import SourcePolicyConfig
from damselfly.plugins.source.file import FileSource
from damselfly.plugins.source.http import HttpSource
from damselfly.sandbox.origin import Origin
from damselfly.security.policy import SourcePolicy
from damselfly.testing.source import CONTENT, Served, SourceConformance


class HeaderKeepingOrigin(Origin):
    """damselfly's counting origin, keeping the headers of each request."""

    def __init__(self, root):
        super().__init__(root)
        self.headers: list[dict[str, str]] = []

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        return await super()._serve(request)


class TestHttp(SourceConformance):
    @pytest.fixture
    def source(self):
        # the origin runs on 127.0.0.1, which the default policy refuses
        return HttpSource(policy=SourcePolicy.from_config(SourcePolicyConfig(allow_loopback=True)))

    @pytest.fixture
    async def origin(self, tmp_path, content):
        (tmp_path / "blob.bin").write_bytes(content)
        served = HeaderKeepingOrigin(tmp_path)
        await served.start()
        yield Served(
            url=served.url("blob.bin"),
            content=content,
            missing_url=served.url("nope.bin"),
            missing_status=404,
            received_headers=lambda: served.headers,
        )
        await served.stop()


def file_origin(tmp_path, content):
    """``content`` in a file of a directory that holds another file, in a subdirectory."""
    root = tmp_path / "origin"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "other.bin").write_bytes(b"other")
    blob = root / "blob.bin"
    blob.write_bytes(content)
    return Served(
        url=blob.as_uri(),
        content=content,
        missing_url=(root / "nope.bin").as_uri(),
        missing_status=404,
        listing_url=root.as_uri(),
    )


class TestFile(SourceConformance):
    @pytest.fixture
    def source(self):
        return FileSource()

    @pytest.fixture
    def origin(self, tmp_path, content):
        return file_origin(tmp_path, content)


class ReadsToTheEnd(FileSource):
    """Ignores the length it is asked for."""

    async def read(self, url, offset, length, headers):
        async for chunk in super().read(url, offset, len(CONTENT) - offset, headers):
            yield chunk


class LeaksOsErrors(FileSource):
    async def stat(self, url, headers):
        return os.stat(urlsplit(url).path)


@pytest.mark.parametrize(
    ("bad", "case"),
    [
        (ReadsToTheEnd, "test_ranged_reads_yield_exactly_what_is_asked"),
        (LeaksOsErrors, "test_a_missing_object_is_a_backend_error"),
    ],
)
async def test_the_kit_catches_a_source_that_breaks_the_contract(tmp_path, bad, case):
    run = getattr(SourceConformance(), case)
    with pytest.raises((AssertionError, FileNotFoundError)):  # a failed check, or the error it let through
        await run(bad(), file_origin(tmp_path, CONTENT))
