"""The proxy on its own: routing, rules, Range, X-Dragonfly headers, CONNECT, health, errors."""

import asyncio
import hashlib

import aiohttp
import pytest

from damselfly.config import load_settings
from damselfly.core.errors import InvalidArgument
from damselfly.daemon.daemon import Daemon
from damselfly.daemon.proxyswarm import parse_range
from damselfly.testing import OriginProcess

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 10)
    assert parse_range("bytes=-5", 100) == (95, 5)
    assert parse_range("bytes=50-500", 100) == (50, 50)
    assert parse_range("bytes=100-", 100) is None
    assert parse_range("bytes=-0", 100) is None
    for bad in ("bytes=", "items=0-1", "bytes=0-1,5-6", "bytes=a-b"):
        with pytest.raises(InvalidArgument):
            parse_range(bad, 100)


@pytest.fixture
def origin(tmp_path):
    o = OriginProcess(tmp_path / "origin")
    yield o
    o.stop()


@pytest.fixture
async def daemon(tmp_path):
    # the origin is on loopback, and CONNECT / absolute-form reach it: both allowed explicitly
    settings = load_settings(
        daemon={"data_dir": str(tmp_path / "d")},
        proxy={"rules": ["/blobs/"], "connect_allow": ["127.0.0.1:*"]},
        security={"sources": {"allow_loopback": True}},
    )
    d = Daemon(settings)
    await d.start()
    yield d
    await d.stop()


async def test_routing_and_the_swarm_path(daemon, origin):
    for d in ("blobs", "manifests"):
        (origin.root / "v2" / "lib" / "app" / d).mkdir(parents=True)
    made = origin.make("v2/lib/app/blobs/made", 9 * MiB)
    data = made.read_bytes()
    digest = hashlib.sha256(data).hexdigest()  # the proxy checks a blob against its digest
    made.rename(made.with_name(f"sha256:{digest}"))
    other = origin.make("v2/lib/app/manifests/latest", 1000).read_bytes()
    proxy = f"http://127.0.0.1:{daemon.proxy.port}"
    registry = f"http://127.0.0.1:{origin.port}"
    origin.reset()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy + "/healthy") as r:
            assert r.status == 200
        async with s.get(proxy + "/server/ping") as r:
            assert r.status == 200
        # a manifest passes straight through, with every Accept header
        accept = [("Accept", "application/vnd.oci.image.index.v1+json"), ("Accept", "application/json")]
        async with s.get(
            proxy + "/v2/lib/app/manifests/latest", headers=[*accept, ("X-Dragonfly-Registry", registry)]
        ) as r:
            assert r.status == 200 and await r.read() == other
            assert "X-Dragonfly-Task-ID" not in r.headers
        # a blob goes through the swarm: registry from ?ns= (containerd's way)
        path = f"/v2/lib/app/blobs/sha256:{digest}?ns=127.0.0.1:{origin.port}"
        async with s.get(proxy + path) as r:
            assert r.status == 200 and await r.read() == data
            task_id = r.headers["X-Dragonfly-Task-ID"]
            assert r.headers["X-Dragonfly-Task-Download-Finished"] == "false"
        assert task_id == digest  # one blob of an anonymous pull is one task, whatever registry serves it
        async with s.get(proxy + path, headers={"Range": "bytes=4194300-4194309"}) as r:
            assert r.status == 206 and await r.read() == data[4194300:4194310]
            assert r.headers["Content-Range"] == f"bytes 4194300-4194309/{len(data)}"
            assert r.headers["X-Dragonfly-Task-Download-Finished"] == "true"
        async with s.get(proxy + path, headers={"Range": f"bytes={len(data)}-"}) as r:
            assert r.status == 416
        # HTTP-proxy mode, absolute URL, with the opt-in header
        async with s.get(
            origin.url("v2/lib/app/manifests/latest"), proxy=proxy, headers={"X-Dragonfly-Use-P2P": "true"}
        ) as r:
            assert r.status == 200 and await r.read() == other and "X-Dragonfly-Task-ID" in r.headers
    stats = origin.stats()
    assert stats["bytes"] <= len(data) + 3 * len(other)  # the blob was read from the origin once


async def test_errors_and_connect(daemon, origin):
    origin.make("x.bin", 100)
    proxy = f"http://127.0.0.1:{daemon.proxy.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy + "/v2/a/blobs/sha256:" + "b" * 64) as r:  # no upstream known
            assert r.status == 400 and r.headers["X-Dragonfly-Error-Type"] == "proxy"
        registry = {"X-Dragonfly-Registry": f"http://127.0.0.1:{origin.port}"}
        async with s.get(proxy + "/v2/a/blobs/sha256:" + "c" * 64, headers=registry) as r:
            assert r.status == 404 and r.headers["X-Dragonfly-Error-Type"] == "backend"
        async with s.get(
            proxy + "/x.bin", headers={**registry, "X-Dragonfly-Use-P2P": "true", "X-Dragonfly-Piece-Length": "x"}
        ) as r:
            assert r.status == 400
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.proxy.port)
    writer.write(
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        + b"GET /x.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    assert reply.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.proxy.port)
    writer.write(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 502")
    writer.close()


async def test_a_tls_hello_is_refused_at_once(daemon):
    """Clients that try HTTPS first (containers/image with insecure = true) must fall back quickly."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.proxy.port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
