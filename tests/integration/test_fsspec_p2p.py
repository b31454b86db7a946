"""``p2p::`` over an HTTP origin: lazy range reads, the fsspec API, errors, the embedded daemon."""

import errno

import fsspec
import pytest

from damselfly.sdk.p2pfs import P2PFileSystem, _embedded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


def _fs(cluster, peer: str = "peer1") -> P2PFileSystem:
    return fsspec.filesystem("p2p", target_protocol="http", daemon=cluster.daemon(peer)["socket"])


async def test_a_header_and_a_slice_of_a_big_file_fetch_two_pieces(damselfly_origin, damselfly_cluster_factory):
    src = damselfly_origin.make("big.bin", 256 * MiB)
    cluster = damselfly_cluster_factory(peers=1)
    damselfly_origin.reset()
    url = damselfly_origin.url("big.bin")
    with fsspec.open(f"p2p::{url}", p2p={"daemon": cluster.daemon("peer1")["socket"]}) as f:
        assert f.size == 256 * MiB
        header = f.read(64)
        f.seek(200 * MiB + 12345)
        middle = f.read(MiB)
    with open(src, "rb") as g:
        assert header == g.read(64)
        g.seek(200 * MiB + 12345)
        assert middle == g.read(MiB)
    sent = damselfly_origin.stats()["bytes"]
    piece = 4 * MiB  # 256 MiB / 500, rounded up to a power of two, clamped to 4-64 MiB
    # the slice straddles a piece boundary only if it must: 200 MiB + 12345 + 1 MiB stays in one piece
    assert 0 < sent <= 2 * piece, f"the origin sent {sent} bytes for two small reads"


async def test_the_fsspec_calls(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("data.bin", 9 * MiB + 7)
    data = src.read_bytes()
    cluster = damselfly_cluster_factory(peers=2)
    url = damselfly_origin.url("data.bin")
    fs = _fs(cluster)
    assert fs.cat_file(url) == data
    assert fs.cat_file(url, start=5 * MiB, end=5 * MiB + 10) == data[5 * MiB : 5 * MiB + 10]
    assert fs.cat_file(url, start=-7) == data[-7:]
    assert fs.cat_file(url, start=len(data) + 5) == b""
    assert fs.cat_ranges([url, url], [0, 4 * MiB - 1], [3, 4 * MiB + 1]) == [data[:3], data[4 * MiB - 1 : 4 * MiB + 1]]
    assert fs.info(url)["size"] == len(data)
    fs.get_file(url, str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == data
    # the second peer knows the length from the swarm, and reads from it
    damselfly_origin.reset()
    other = _fs(cluster, "peer2")
    assert other.info(url)["size"] == len(data)
    with other.open(url) as f:
        f.seek(8 * MiB)
        assert f.read() == data[8 * MiB :]
        f.seek(1)
        assert f.read(2) == data[1:3]
    assert damselfly_origin.stats()["bytes"] == 0
    with pytest.raises(PermissionError):
        fs.open(url, "wb")
    with pytest.raises(PermissionError):
        fs.rm(url)


async def test_errors_are_the_ones_data_tools_expect(damselfly_origin, damselfly_cluster_factory):
    damselfly_origin.make("here.bin", 10)
    cluster = damselfly_cluster_factory(peers=1)
    fs = _fs(cluster)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(damselfly_origin.url("missing.bin"))
    with pytest.raises(FileNotFoundError):
        fs.open(damselfly_origin.url("missing.bin"))
    gone = fsspec.filesystem("p2p", target_protocol="http", daemon="/nonexistent/dfdaemon.sock")
    with pytest.raises(OSError, match="no daemon socket") as info:
        gone.cat_file(damselfly_origin.url("here.bin"))
    assert info.value.errno == errno.EIO


def test_an_embedded_daemon_when_none_is_running(damselfly_origin, tmp_path, monkeypatch):
    """No daemon configured or running: the filesystem starts one in this process."""
    monkeypatch.setenv("DAMSELFLY_DAEMON__DATA_DIR", str(tmp_path / "no-daemon-here"))
    src = damselfly_origin.make("e.bin", 5 * MiB)
    url = damselfly_origin.url("e.bin")
    opened = fsspec.open(f"p2p::{url}", p2p={"embedded_dir": str(tmp_path / "emb")})
    with opened as f:
        f.seek(4 * MiB)
        assert f.read(16) == src.read_bytes()[4 * MiB : 4 * MiB + 16]
    # the process's one embedded daemon (started here, or by an earlier test in this process) served it
    embedded = _embedded["daemon"]
    assert opened.fs.socket() == embedded.socket_path
    assert any(t.url == url for t in embedded.storage.tasks()), "the embedded daemon keeps what it fetched"
