"""``p2p::s3://`` on a second peer against plain ``s3://`` (s3fs), both reading one object from moto_server.

    python benchmarks/fsspec_s3.py [--size 512MiB] [--runs 3] [--json]

A real S3 API (moto_server: the one ``.ci/run`` exports through
``DAMSELFLY_TEST_S3_ENDPOINT``, else one started here) holds one object. A cluster
(scheduler, seed, two peers) runs on loopback. Each run, in the same process and
one after the other:

- ``s3fs``: ``fsspec.filesystem("s3").cat_file`` reads the object straight from S3;
- ``p2p cold``: the first peer reads ``p2p::s3://...`` (its seed fetches from S3);
- ``p2p second peer``: the second peer reads the same url, from the swarm.

For each: seconds, MB/s, and the bytes S3 sent for it (the daemons'
back-to-source traffic metric; s3fs reads the whole object). The tasks are
deleted between runs so every run starts cold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import fsspec

from damselfly.core.units import format_size, parse_size
from damselfly.sdk.client import Client
from damselfly.testing import start_cluster
from damselfly.testing.s3 import s3_server

BACK_TO_SOURCE = ("dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}')


def _source_bytes(cluster) -> float:  # type: ignore[no-untyped-def]
    return sum(cluster.metric(d["name"], *BACK_TO_SOURCE) or 0 for d in cluster.daemons)


def _timed_read(fs, path: str) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    data = fs.cat_file(path)
    return time.perf_counter() - t0, len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="Print only the JSON line.")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="damselfly-bench-s3-"))
    servers = s3_server(work)
    s3 = next(servers)
    try:
        bucket = s3.bucket()
        block = bytes(range(256)) * 4096
        body = (block * (size // len(block) + 1))[:size]
        s3.client().put_object(Bucket=bucket, Key="object.bin", Body=body)
        del body
        cluster = start_cluster(work / "cluster", 2)
        try:
            rows: dict[str, list[tuple[float, float]]] = {"s3fs": [], "p2p cold": [], "p2p second peer": []}
            plain = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options)
            for _ in range(args.runs):
                seconds, got = _timed_read(plain, f"{bucket}/object.bin")
                assert got == size
                rows["s3fs"].append((seconds, size))
                for name, peer in (("p2p cold", "peer1"), ("p2p second peer", "peer2")):
                    before = _source_bytes(cluster)
                    fs = fsspec.filesystem(
                        "p2p",
                        target_protocol="s3",
                        target_options=s3.storage_options,
                        daemon=cluster.daemon(peer)["socket"],
                        skip_instance_cache=True,
                    )
                    seconds, got = _timed_read(fs, f"{bucket}/object.bin")
                    assert got == size
                    rows[name].append((seconds, _source_bytes(cluster) - before))
                for d in cluster.daemons:  # cold again next run

                    async def forget(socket: str) -> None:
                        async with Client(socket) as c:
                            for t in await c.list_tasks():
                                await c.delete_task(t.task_id)

                    asyncio.run(forget(d["socket"]))
        finally:
            cluster.down()
    finally:
        try:
            next(servers)
        except StopIteration:
            pass
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": f"{os.cpu_count()} cpus, Python {platform.python_version()}",
        "size": size,
        "runs": args.runs,
    }
    for name, samples in rows.items():
        secs = statistics.median(s for s, _ in samples)
        result[name] = {
            "seconds": round(secs, 3),
            "mb_per_s": round(size / secs / 1e6, 1),
            "s3_bytes": int(statistics.median(b for _, b in samples)),
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'reader':<18}{'seconds':>9}{'MB/s':>9}{'bytes from S3':>16}")
    for name in rows:
        r = result[name]
        print(f"{name:<18}{r['seconds']:>9.2f}{r['mb_per_s']:>9.1f}{format_size(r['s3_bytes']):>16}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
