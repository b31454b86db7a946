"""The http source against a real HTTP server (damselfly's counting origin)."""

import pytest

from damselfly.config import SourcePolicyConfig
from damselfly.core.errors import BackendError, PermissionDenied
from damselfly.plugins.source.http import HttpSource
from damselfly.sandbox.origin import Origin, make_file
from damselfly.security.policy import SourcePolicy
from tests.helpers.web import http_server

# the origin of these tests runs on 127.0.0.1, which the default policy refuses
LOOPBACK = SourcePolicy.from_config(SourcePolicyConfig(allow_loopback=True))


@pytest.fixture
async def origin(tmp_path):
    make_file(tmp_path / "f.bin", 1_000_000)
    o = Origin(tmp_path)
    await o.start()
    yield o
    await o.stop()


async def test_stat_uses_head_and_sends_no_body(origin):
    src = HttpSource(policy=LOOPBACK)
    info = await src.stat(origin.url("f.bin"), {})
    assert info.content_length == 1_000_000 and info.supports_range
    assert origin.stats.bytes_sent == 0 and origin.stats.by_method == {"HEAD": 1}
    await src.close()


async def test_read_a_range(origin, tmp_path):
    src = HttpSource(policy=LOOPBACK)
    got = b"".join([c async for c in src.read(origin.url("f.bin"), 1000, 300_000, {"X-Test": "1"})])
    assert got == (tmp_path / "f.bin").read_bytes()[1000:301_000]
    assert origin.stats.bytes_sent == 300_000
    await src.close()


async def test_missing_file_is_a_backend_error(origin):
    src = HttpSource(policy=LOOPBACK)
    with pytest.raises(BackendError) as err:
        await src.stat(origin.url("nope.bin"), {})
    assert err.value.status_code == 404
    with pytest.raises(BackendError, match="404"):
        _ = [c async for c in src.read(origin.url("nope.bin"), 0, 10, {})]
    await src.close()


async def test_unreachable_origin_is_a_backend_error():
    src = HttpSource(policy=LOOPBACK)
    with pytest.raises(BackendError, match="cannot reach"):
        await src.stat("http://127.0.0.1:9/x", {})
    await src.close()


async def test_origin_connections_take_the_configured_buffers(origin, tmp_path):
    import socket

    from damselfly.plugins.source.options import HttpConfig

    seen: list[socket.socket] = []
    src = HttpSource(HttpConfig(socket_buffer=1 << 20, read_buffer=2 << 20), policy=LOOPBACK)
    make = src._socket
    src._socket = lambda info: seen.append(make(info)) or seen[-1]  # type: ignore[method-assign]
    got = b"".join([c async for c in src.read(origin.url("f.bin"), 0, 1_000_000, {})])
    assert got == (tmp_path / "f.bin").read_bytes()
    assert len(seen) == 1
    assert seen[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 20  # Linux doubles what is asked
    assert src._client()._read_bufsize == 2 << 20
    await src.close()
    default = HttpSource(policy=LOOPBACK)._socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0)))
    assert default.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 1 << 20  # left to autotuning
    default.close()
    with pytest.raises(Exception, match="socket_buffer"):
        HttpSource.parse_options({"socket_buffer": -1}, "sources.http")


async def test_the_default_policy_refuses_a_loopback_origin_naming_the_setting(origin):
    src = HttpSource()  # made outside any download: the default policy
    with pytest.raises(PermissionDenied, match=r"security\.sources\.allow_loopback"):
        await src.stat(origin.url("f.bin"), {})
    with pytest.raises(PermissionDenied, match="loopback"):
        _ = [c async for c in src.read(origin.url("f.bin"), 0, 10, {})]
    await src.close()
    assert origin.stats.by_method == {}  # nothing reached the origin


async def test_redirects_are_followed_at_most_max_redirects():
    from aiohttp import web

    hops: list[int] = []

    async def hop(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        hops.append(n)
        if n < 10:
            raise web.HTTPFound(f"/hop/{n + 1}")
        return web.Response(body=b"x" * 10)

    async with http_server(hop, "/hop/{n}") as base:
        two = SourcePolicy.from_config(SourcePolicyConfig(allow_loopback=True, max_redirects=2))
        src = HttpSource(policy=two)
        with pytest.raises(BackendError, match=r"more than 2 redirects \(security\.sources\.max_redirects\)"):
            await src.stat(f"{base}/hop/0", {})
        await src.close()
        assert hops == [0, 1, 2]  # the first request and two redirects, not a third
        hops.clear()
        src = HttpSource(policy=LOOPBACK)  # five by default: from 7, three hops reach 10
        assert (await src.stat(f"{base}/hop/7", {})).content_length == 10
        await src.close()
