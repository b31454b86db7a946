"""The scheduler killed and restarted on its address mid-download: the download finishes with the
right bytes, and the new scheduler process rebuilds its state from the daemons' re-announcements."""

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from damselfly.daemon.request import DownloadRequest
from damselfly.sandbox import cluster as cl
from damselfly.sdk.client import Client
from damselfly.testing import Cluster, OriginProcess
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restart_scheduler(cluster: Cluster) -> None:
    """Start the cluster's scheduler again, on the address it had, with its config."""
    directory = cluster.directory
    port = cluster.info["scheduler"].rsplit(":", 1)[1]
    ready_file = directory / "run" / "scheduler-again.json"
    env = {
        **cl.base_env(cluster.env),
        "DAMSELFLY_CONFIG": str(cl.config_path(directory, "scheduler")),
        "DAMSELFLY_SCHEDULER__PORT": port,
    }
    log = directory / "logs" / "scheduler-again.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "damselfly", "scheduler", "--ready-file", str(ready_file)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    proc = cl.Proc("scheduler-again", popen, ready_file, log)
    cluster.procs.append(proc)  # stopped with the cluster
    cl.wait_ready([proc])


async def known(cluster: Cluster, task_id: str) -> tuple[int, set[str]]:
    """The task's peer count (0: unknown) and the host names the scheduler has."""
    async with cluster.channel() as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        hosts = {h.hostname for h in (await stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5)).hosts}
        try:
            task = await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=5)
        except grpc.aio.AioRpcError:
            return 0, hosts
        return task.peer_count, hosts


async def test_a_scheduler_restarted_mid_download_is_told_again_and_the_download_finishes(
    damselfly_cluster_factory, tmp_path
):
    size = 12 * MiB
    origin = OriginProcess(tmp_path / "origin", rate="6MB/s")  # slow enough to restart the scheduler mid-download
    try:
        src = origin.make("blob.bin", size)
        url = origin.url("blob.bin")
        task_id = DownloadRequest(url=url).task_id()
        cluster = damselfly_cluster_factory(peers=2)
        async with Client(cluster.daemon("peer1")["socket"]) as c:
            running = asyncio.ensure_future(c.download(url, tmp_path / "out1"))
            await wait_for(lambda: origin.stats()["bytes"] >= 2 * MiB, what="the download to be under way")
            cluster.stop_scheduler(kill=True)
            restart_scheduler(cluster)
            result = await running
        assert sha(tmp_path / "out1") == sha(src)
        assert result.peer_bytes + result.source_bytes == size

        # the seed's finished task and both hosts, from the daemons' re-announcements alone
        peers, hosts = await wait_for(
            lambda: _told(cluster, task_id), timeout=20, what="the daemons to tell the new scheduler"
        )
        assert peers >= 2 and {cl.hostname_of("seed"), cl.hostname_of("peer1")} <= hosts
        assert "announcing to it again" in cluster.log("seed")

        # another peer is handed the holders the new scheduler learnt, and reads nothing from the origin
        async with Client(cluster.daemon("peer2")["socket"]) as c:
            second = await c.download(url, tmp_path / "out2")
        assert sha(tmp_path / "out2") == sha(src)
        assert second.peer_bytes == size and second.source_bytes == 0
        # Without the restart the origin sends the file once (the seed and peer1 share the read).
        # With it, the pieces whose digests died with the old scheduler are read again (by peer1,
        # or by the seed, which cannot check peer1's share): the origin sends the file at most once more.
        assert size <= origin.stats()["bytes"] <= 2 * size
    finally:
        origin.stop()


async def _told(cluster: Cluster, task_id: str) -> tuple[int, set[str]] | None:
    peers, hosts = await known(cluster, task_id)
    holders = {cl.hostname_of("seed"), cl.hostname_of("peer1")}
    # the seed tells of its task once its own download, under way at the restart, has ended
    seed_told = "announced stored task" in cluster.log("seed")
    return (peers, hosts) if peers >= 2 and holders <= hosts and seed_told else None
