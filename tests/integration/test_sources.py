"""Source plugins against their origins: Hugging Face (a stand-in hub), HDFS (a stand-in WebHDFS
namenode), S3 prefixes (moto_server) and the fsspec fallback; recursive ``damselfly get``."""

import os
import subprocess
import sys

import pytest

from damselfly.core.errors import BackendError, NotFound
from damselfly.sdk.client import Client
from damselfly.testing.origins import FakeHub, FakeWebHdfs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


def blob(n: int, seed: int) -> bytes:
    return bytes((i * seed + seed) % 251 for i in range(256)) * (n // 256) + b"x" * (n % 256)


def get(cluster, peer: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "damselfly", "get", *args, "--socket", cluster.daemon(peer)["socket"], "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())


@pytest.fixture
def hub(tmp_path):
    h = FakeHub(tmp_path / "hub", private={"acme/llm": "hf_secret"}, page_size=2).start()
    yield h
    h.stop()


async def test_hugging_face_files_come_from_the_hub_once(hub, damselfly_cluster_factory, tmp_path):
    weights = blob(9 * MiB + 3, 3)
    hub.add("acme/llm", "model.safetensors", weights)
    hub.add("acme/llm", "model.safetensors", blob(MiB, 5), revision="v2")
    cluster = damselfly_cluster_factory(peers=2, env={"DAMSELFLY_SOURCES__HF__BASE_URL": hub.base})
    options = {"hugging_face": {"token": "hf_secret"}}
    url = "hf://acme/llm/model.safetensors"
    for peer in ("peer1", "peer2"):
        async with Client(cluster.daemon(peer)["socket"]) as c:
            await c.download(url, tmp_path / f"{peer}.bin", source_options=options)
        assert (tmp_path / f"{peer}.bin").read_bytes() == weights
    assert hub.bytes_sent == len(weights)  # the hub sent the file once, to the seed
    # another revision is another task, with its own content
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        v2 = {"hugging_face": {"token": "hf_secret", "revision": "v2"}}
        await c.download(url, tmp_path / "v2.bin", source_options=v2)
        await c.download("hf://acme/llm@v2/model.safetensors", tmp_path / "v2b.bin", source_options=options)
        with pytest.raises(BackendError, match="401"):
            await c.download("hf://acme/llm/other.bin", tmp_path / "nope.bin")
    assert (tmp_path / "v2.bin").read_bytes() == (tmp_path / "v2b.bin").read_bytes() == blob(MiB, 5)
    assert not (tmp_path / "nope.bin").exists()


def test_recursive_get_of_a_dataset(hub, damselfly_cluster_factory, tmp_path):
    files = {"README.md": b"# data\n", "data/train-0.json": blob(3000, 7), "data/train-1.json": blob(5000, 9)}
    files["data/big.bin"] = blob(5 * MiB, 11)
    for path, data in files.items():
        hub.add("org/set", path, data, repo_type="datasets")
    cluster = damselfly_cluster_factory(peers=1, env={"DAMSELFLY_SOURCES__HF__BASE_URL": hub.base})
    out = tmp_path / "snapshot"
    proc = get(cluster, "peer1", "-r", "hf://datasets/org/set/", "-O", str(out), "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files
    assert hub.count("GET tree") >= 2  # the listing came in pages of two
    only = tmp_path / "json"
    proc = get(cluster, "peer1", "-r", "hf://datasets/org/set/data", "-O", str(only), "--include", "*.json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(only)) for p in only.rglob("*") if p.is_file()) == ["train-0.json", "train-1.json"]
    proc = get(cluster, "peer1", "-r", "hf://datasets/org/set/", "-O", str(tmp_path / "none"), "--include", "*.csv")
    assert proc.returncode != 0 and "no files under" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


async def test_hdfs_over_webhdfs(damselfly_cluster_factory, tmp_path):
    root = tmp_path / "hdfs"
    (root / "warehouse" / "part").mkdir(parents=True)
    data = blob(6 * MiB, 13)
    (root / "warehouse" / "t.orc").write_bytes(data)
    (root / "warehouse" / "part" / "p0").write_bytes(b"p0 bytes")
    namenode = FakeWebHdfs(root, delegation_token="tok-123").start()
    try:
        cluster = damselfly_cluster_factory(peers=2)
        url = f"hdfs://127.0.0.1:{namenode.port}/warehouse/t.orc"
        options = {"hdfs": {"delegation_token": "tok-123"}}
        for peer in ("peer1", "peer2"):
            async with Client(cluster.daemon(peer)["socket"]) as c:
                await c.download(url, tmp_path / f"{peer}.orc", source_options=options)
            assert (tmp_path / f"{peer}.orc").read_bytes() == data
        assert namenode.bytes_sent == len(data)
        # the token is peer1's (without TLS it goes to no seed): peer1 reads the file, 6 MiB, in one OPEN
        assert namenode.count("OPEN") == 1
        async with Client(cluster.daemon("peer1")["socket"]) as c:
            with pytest.raises(BackendError, match="403"):
                await c.download(url.replace("t.orc", "x"), tmp_path / "x")
            with pytest.raises((BackendError, NotFound), match="does not exist"):
                await c.download(url.replace("t.orc", "missing"), tmp_path / "m", source_options=options)
            entries = await c.list_entries(url.rsplit("/", 1)[0], source_options=options)
        assert [(e.url.rsplit("/", 2)[-2:], e.is_dir) for e in entries] == [
            (["warehouse", "part"], True),
            (["part", "p0"], False),
            (["warehouse", "t.orc"], False),
        ]
        proc = get(
            cluster,
            "peer1",
            "-r",
            f"hdfs://127.0.0.1:{namenode.port}/warehouse",
            "-O",
            str(tmp_path / "wh"),
            "--hdfs-delegation-token",
            "tok-123",
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "wh" / "part" / "p0").read_bytes() == b"p0 bytes"
        assert (tmp_path / "wh" / "t.orc").read_bytes() == data
    finally:
        namenode.stop()


def test_recursive_get_of_an_s3_prefix(damselfly_s3, damselfly_cluster_factory, tmp_path):
    s3 = damselfly_s3
    bucket = s3.bucket()
    objects = {"logs/a.csv": b"a,1\n", "logs/b.csv": b"b,2\n", "logs/sub/c.csv": b"c,3\n", "logs/skip.txt": b"no"}
    for key, body in objects.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=body)
    cluster = damselfly_cluster_factory(peers=1)
    out = tmp_path / "logs"
    proc = get(
        cluster,
        "peer1",
        "-r",
        f"s3://{bucket}/logs/",
        "-O",
        str(out),
        "--include",
        "*.csv",
        "--storage-endpoint",
        s3.endpoint,
        "--storage-access-key-id",
        s3.object_storage["access_key_id"],
        "--storage-access-key-secret",
        s3.object_storage["access_key_secret"],
        "--storage-region",
        "us-east-1",
    )
    assert proc.returncode == 0, proc.stderr
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {"a.csv": b"a,1\n", "b.csv": b"b,2\n", "sub/c.csv": b"c,3\n"}


async def test_any_fsspec_protocol_is_a_source(tmp_path):
    """``memory://`` (fsspec's in-process filesystem) through a daemon in this process."""
    import fsspec

    from damselfly.config import load_settings
    from damselfly.daemon.daemon import Daemon

    mem = fsspec.filesystem("memory")
    payload = blob(5 * MiB, 17)
    mem.pipe_file("/damselfly-test/dir/one.bin", payload)
    mem.pipe_file("/damselfly-test/dir/two.bin", b"two")
    daemon = Daemon(load_settings(daemon={"data_dir": str(tmp_path / "d")}))
    await daemon.start()
    try:
        async with Client(daemon.socket_path) as c:
            r = await c.download("memory://damselfly-test/dir/one.bin", tmp_path / "one.bin")
            entries = await c.list_entries("memory://damselfly-test/dir")
            with pytest.raises((BackendError, NotFound)):
                await c.download("memory://damselfly-test/dir/missing", tmp_path / "missing")
        assert (tmp_path / "one.bin").read_bytes() == payload and r.source_bytes == len(payload)
        assert sorted((e.url, e.content_length) for e in entries) == [
            ("memory://damselfly-test/dir/one.bin", len(payload)),
            ("memory://damselfly-test/dir/two.bin", 3),
        ]
    finally:
        await daemon.stop()
        mem.rm("/damselfly-test", recursive=True)
