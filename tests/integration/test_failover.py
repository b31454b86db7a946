"""Several schedulers: a task goes to one by hashing its id; when it dies, its tasks move on."""

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.schedulers import SchedulerPool
from damselfly.sdk.client import Client
from damselfly.testing import OriginProcess
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def peers_known(address: str, task_id: str) -> int:
    """How many peers scheduler ``address`` has for the task (0 when it does not know it)."""
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            task = await scheduler_pb2_grpc.SchedulerStub(ch).StatTask(
                scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=5
            )
        except grpc.aio.AioRpcError:
            return 0
        return task.peer_count


def test_tasks_are_spread_over_schedulers_by_their_id():
    pool = SchedulerPool(["10.0.0.1:8002", "10.0.0.2:8002", "10.0.0.3:8002"], connect_timeout=1)
    homes = [pool.order(hashlib.sha256(str(i).encode()).hexdigest())[0] for i in range(300)]
    assert {homes.count(a) for a in pool.addresses} <= set(range(60, 141))  # each takes about a third
    assert pool.order("ab" * 32) == pool.order("ab" * 32)  # stable
    first = pool.order("cd" * 32)[0]
    pool.mark_down(first)
    assert pool.preference("cd" * 32)[0] == pool.order("cd" * 32)[1]  # its tasks go to the next one
    assert not pool.mark_down(first)  # already down


async def test_a_dead_scheduler_hands_its_tasks_to_the_next_and_running_downloads_finish(
    damselfly_cluster_factory, tmp_path
):
    origin = OriginProcess(tmp_path / "origin", rate="8MB/s")  # slow enough to kill a scheduler mid-download
    try:
        src = origin.make("blob.bin", 24 * MiB)
        url = origin.url("blob.bin")
        cluster = damselfly_cluster_factory(peers=2, schedulers=2)
        addresses = [s["address"] for s in cluster.info["schedulers"]]
        task_id = DownloadRequest(url=url).task_id()
        home, other = SchedulerPool(addresses, 1).order(task_id)

        async with Client(cluster.daemon("peer1")["socket"]) as c:
            running = asyncio.ensure_future(c.download(url, tmp_path / "out1"))
            await wait_for(lambda: origin.stats()["bytes"] >= 8 * MiB, what="the download to be under way")
            assert await peers_known(home, task_id) >= 2  # the seed and peer1 announced there
            assert await peers_known(other, task_id) == 0
            cluster.stop_scheduler(home, kill=True)
            first = await running  # finishes with the parents it had
        assert sha(tmp_path / "out1") == sha(src)
        # from its parents, and its share of the source read (the seed and peer1 read half each)
        assert first.peer_bytes + first.source_bytes == 24 * MiB and first.peer_bytes > 0

        # the task now belongs to the other scheduler, and peer1 told it that it holds the task
        await wait_for(lambda: peers_known(other, task_id), what="peer1 to announce the task to the next scheduler")
        async with Client(cluster.daemon("peer2")["socket"]) as c:
            second = await c.download(url, tmp_path / "out2")
        assert sha(tmp_path / "out2") == sha(src)
        assert second.peer_bytes == 24 * MiB and second.source_bytes == 0
        # The seed could not check the pieces peer1 read as its share against any digest once their
        # scheduler was gone (peer1 is no seed), so it read them from the origin itself: at most
        # peer1's share again, and never a wait for a digest that no scheduler will give.
        assert 24 * MiB <= origin.stats()["bytes"] <= 24 * MiB + first.source_bytes
        assert "does not answer" in cluster.log("peer2")  # it tried the dead one, then the next
    finally:
        origin.stop()
