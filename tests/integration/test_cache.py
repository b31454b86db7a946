"""Persistent cache tasks: import on one peer, export on another after the importer is gone."""

import json
import os
import subprocess
import sys

import pytest

from damselfly.sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


def cli(cluster, peer: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "damselfly", "cache", *args, "--socket", cluster.daemon(peer)["socket"]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())


async def test_import_export_with_the_importer_stopped(damselfly_cluster_factory, tmp_path):
    cluster = damselfly_cluster_factory(peers=3)
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(9 * MiB + 11))
    proc = cli(cluster, "peer1", "import", str(src), "--ttl", "2h", "--replicas", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    task_id = result["task_id"]
    assert result["content_length"] == src.stat().st_size
    by_host = {d["host_id"]: d["name"] for d in cluster.daemons}
    holders = [by_host[h] for h in result["replicas"]]
    assert holders[0] == "peer1" and len(holders) == 2
    stat = cli(cluster, "peer2", "stat", task_id, "--json")
    assert stat.returncode == 0, stat.stderr
    assert json.loads(stat.stdout)["content_length"] == src.stat().st_size

    cluster.stop_daemon("peer1")
    reader = next(p for p in ("peer2", "peer3", "seed") if p not in holders)
    out = tmp_path / "exported.bin"
    async with Client(cluster.daemon(reader)["socket"]) as c:
        r = await c.cache_export(task_id, out)
    assert out.read_bytes() == src.read_bytes()
    assert r.peer_bytes == src.stat().st_size  # from the surviving replica
    assert list(r.bytes_by_parent) and all(holders[1] in parent for parent in r.bytes_by_parent)


async def test_a_cache_task_nobody_holds(damselfly_cluster_factory, tmp_path):
    cluster = damselfly_cluster_factory(peers=1)
    src = tmp_path / "only-here.bin"
    src.write_bytes(b"x" * 1000)
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        r = await c.cache_import(src, ttl=60)
    assert r["replicas"] and len(r["replicas"]) == 1
    cluster.stop_daemon("peer1")
    proc = cli(cluster, "seed", "export", r["task_id"], "-O", str(tmp_path / "x"))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    bad = cli(cluster, "seed", "export", "ab" * 32, "-O", str(tmp_path / "y"))
    assert bad.returncode != 0 and "not found" in bad.stderr


def test_import_refuses_bad_input(damselfly_cluster_factory, tmp_path):
    cluster = damselfly_cluster_factory(peers=1)
    f = tmp_path / "f"
    f.write_bytes(b"1")
    proc = cli(cluster, "peer1", "import", str(f), "--ttl", "soon")
    assert proc.returncode == 2 and "not a duration" in proc.stderr
    proc = cli(cluster, "peer1", "import", str(f), "--ttl", "0")
    assert proc.returncode == 1 and "positive --ttl" in proc.stderr
    proc = cli(cluster, "peer1", "import", str(f), "--replicas", "3")  # the seed is the only other host
    assert proc.returncode == 0 and "only 2 of 3 replicas" in proc.stderr
