"""Data tools through the swarm: pandas and pyarrow read ``p2p::s3://`` from a real S3 API (moto_server)."""

import io

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _table(n: int, seed: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(seed, seed + n), "name": [f"row-{i}" for i in range(seed, seed + n)]})


def _put_parquet(s3, bucket: str, key: str, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, row_group_size=max(1, len(df) // 4))
    s3.client().put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def _objects_read(s3, bucket: str) -> list[tuple[str, str, int]]:
    """Requests that read or stat an object (not the bucket listing)."""
    return [r for r in s3.requests(bucket) if r[0] in ("GET", "HEAD") and "?" not in r[1] and r[1] != f"/{bucket}"]


async def test_pandas_and_pyarrow_through_two_peers(damselfly_s3, damselfly_cluster_factory):
    s3 = damselfly_s3
    bucket = s3.bucket()
    table = _table(20_000, 0)
    _put_parquet(s3, bucket, "table.parquet", table)
    parts = [_table(5_000, i * 5_000) for i in range(3)]
    for i, part in enumerate(parts):
        _put_parquet(s3, bucket, f"ds/part-{i}.parquet", part)
    # mutual TLS: the request's S3 credentials then travel with it to the seed (never without)
    cluster = damselfly_cluster_factory(peers=2, tls=True)

    def options(peer: str) -> dict:
        return {"s3": s3.storage_options, "p2p": {"daemon": cluster.daemon(peer)["socket"]}}

    def read_dataset(peer: str) -> pa.Table:
        p2p = fsspec.filesystem(
            "p2p", target_protocol="s3", target_options=s3.storage_options, daemon=cluster.daemon(peer)["socket"]
        )
        ds = pads.dataset(f"{bucket}/ds/", filesystem=PyFileSystem(FSSpecHandler(p2p)), format="parquet")
        return ds.to_table().sort_by("id")

    url = f"p2p::s3://{bucket}/table.parquet"
    first = pd.read_parquet(url, storage_options=options("peer1"))
    pd.testing.assert_frame_equal(first, table)
    got = read_dataset("peer1")
    assert got.column("id").to_pylist() == list(range(15_000))
    before = _objects_read(s3, bucket)
    assert before, "the first peer's reads reached S3 (through the seed)"

    second = pd.read_parquet(url, storage_options=options("peer2"))
    pd.testing.assert_frame_equal(second, table)
    assert read_dataset("peer2").equals(got)
    after = _objects_read(s3, bucket)
    assert after == before, f"the second peer's reads reached S3: {after[len(before) :]}"
    back_to_source = '{traffic_type="back_to_source"}'
    assert not cluster.metric("peer2", "dragonfly_dfdaemon_download_traffic_bytes_total", back_to_source)


async def test_s3_get_with_request_credentials(damselfly_s3, damselfly_cluster_factory, tmp_path):
    """`damselfly get`'s --storage-* options reach the seed through the scheduler, over mutual TLS."""
    from damselfly.core.errors import BackendError
    from damselfly.sdk.client import Client

    s3 = damselfly_s3
    bucket = s3.bucket()
    payload = bytes(range(256)) * 40_000  # 10 MB: three pieces
    s3.client().put_object(Bucket=bucket, Key="blob.bin", Body=payload)
    cluster = damselfly_cluster_factory(peers=1, tls=True)
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        r = await c.download(
            f"s3://{bucket}/blob.bin", tmp_path / "out.bin", source_options={"object_storage": s3.object_storage}
        )
    assert (tmp_path / "out.bin").read_bytes() == payload
    # the seed, handed the request's credentials over mutual TLS, read its share of S3, and peer1
    # (whose credentials they are) the rest
    assert r.peer_bytes > 0 and r.peer_bytes + r.source_bytes == len(payload)
    gets = [m for m, _, _ in _objects_read(s3, bucket) if m == "GET"]
    assert len(gets) == 1 + (r.source_bytes > 0)  # one ranged GET per reader for its block of pieces
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        with pytest.raises(BackendError, match="not found"):
            await c.download(
                f"s3://{bucket}/missing.bin", tmp_path / "nope", source_options={"object_storage": s3.object_storage}
            )
    assert not (tmp_path / "nope").exists()


async def test_without_tls_request_credentials_stay_with_the_requesting_peer(
    damselfly_s3, damselfly_cluster_factory, tmp_path
):
    """Credentials travel only over mutual TLS: without it the seed is not handed them, and the
    peer that holds them reads the private object itself; the download still works."""
    from damselfly.sdk.client import Client

    s3 = damselfly_s3
    bucket = s3.bucket()
    payload = bytes(range(256)) * 20_000
    s3.client().put_object(Bucket=bucket, Key="private.bin", Body=payload)
    cluster = damselfly_cluster_factory(peers=1)
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        r = await c.download(
            f"s3://{bucket}/private.bin", tmp_path / "out.bin", source_options={"object_storage": s3.object_storage}
        )
    assert (tmp_path / "out.bin").read_bytes() == payload
    assert r.peer_bytes == 0 and r.source_bytes == len(payload)  # the peer read S3 with its own credentials
    back_to_source = '{traffic_type="back_to_source"}'
    assert not cluster.metric("seed", "dragonfly_dfdaemon_download_traffic_bytes_total", back_to_source)
