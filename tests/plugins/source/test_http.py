"""The http source against a real HTTP server (damselfly's counting origin)."""

import pytest

from damselfly.core.errors import BackendError
from damselfly.origin import Origin, make_file
from damselfly.plugins.source.http import HttpSource


@pytest.fixture
async def origin(tmp_path):
    make_file(tmp_path / "f.bin", 1_000_000)
    o = Origin(tmp_path)
    await o.start()
    yield o
    await o.stop()


async def test_stat_uses_head_and_sends_no_body(origin):
    src = HttpSource()
    info = await src.stat(origin.url("f.bin"), {})
    assert info.content_length == 1_000_000 and info.supports_range
    assert origin.stats.bytes_sent == 0 and origin.stats.by_method == {"HEAD": 1}
    await src.close()


async def test_read_a_range(origin, tmp_path):
    src = HttpSource()
    got = b"".join([c async for c in src.read(origin.url("f.bin"), 1000, 300_000, {"X-Test": "1"})])
    assert got == (tmp_path / "f.bin").read_bytes()[1000:301_000]
    assert origin.stats.bytes_sent == 300_000
    await src.close()


async def test_missing_file_is_a_backend_error(origin):
    src = HttpSource()
    with pytest.raises(BackendError) as err:
        await src.stat(origin.url("nope.bin"), {})
    assert err.value.status_code == 404
    with pytest.raises(BackendError, match="404"):
        _ = [c async for c in src.read(origin.url("nope.bin"), 0, 10, {})]
    await src.close()


async def test_unreachable_origin_is_a_backend_error():
    src = HttpSource()
    with pytest.raises(BackendError, match="cannot reach"):
        await src.stat("http://127.0.0.1:9/x", {})
    await src.close()
