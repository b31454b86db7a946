"""A scheduler new to a daemon (a restart, or back after failing) is told again what the daemon
holds; a seed asked for a task it holds registers it at once."""

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core.peer import PeerState
from damselfly.daemon.daemon import Daemon
from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.schedulers import SchedulerPool
from damselfly.scheduler import start_scheduler
from damselfly.sdk.client import Client
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def finished_peers(scheduler, task_id: str) -> list[str]:
    """The hosts of the task's finished peers, as ``scheduler`` knows them."""
    st = scheduler.service.state
    entry = st.tasks.get(task_id)
    if entry is None:
        return []
    return [st.peers[p].host_id for p in entry.task.peer_ids if st.peers[p].state is PeerState.SUCCEEDED]


async def announce(pool: SchedulerPool, host: common_pb2.Host) -> tuple[list[str], list[str]]:
    """AnnounceHost to the pool's schedulers: (those new to the pool that took it, those that failed)."""
    _, failed = await pool.announce_host(host, 60)
    return pool.take_new(), failed


async def test_a_scheduler_is_new_to_the_pool_at_first_after_a_failure_and_after_a_restart():
    scheduler = await start_scheduler(load_settings())
    pool = SchedulerPool([scheduler.address], connect_timeout=2)
    host = common_pb2.Host(id="pool-host", ip="127.0.0.1", hostname="pool-host", port=4000, download_port=4001)
    try:
        assert await announce(pool, host) == ([scheduler.address], [])
        assert await announce(pool, host) == ([], [])  # the same process: nothing to tell it
        pool.mark_down(scheduler.address)  # a call to it failed
        assert await announce(pool, host) == ([scheduler.address], [])
        port = int(scheduler.address.rsplit(":", 1)[1])
        await scheduler.stop()
        assert await announce(pool, host) == ([], [scheduler.address])
        scheduler = await start_scheduler(load_settings(scheduler={"port": port}))
        assert await announce(pool, host) == ([scheduler.address], [])  # a new process: told again
    finally:
        await pool.close()
        await scheduler.stop()


async def test_a_restarted_scheduler_learns_the_seeds_hosts_and_finished_tasks_again(damselfly_origin, tmp_path):
    damselfly_origin.make("f.bin", 2 * MiB + 3)
    url = damselfly_origin.url("f.bin")
    scheduler = await start_scheduler(load_settings())
    seed = Daemon(
        load_settings(
            host={"hostname": "reannounce-seed"},
            daemon={"seed": True, "data_dir": str(tmp_path / "seed"), "schedulers": [scheduler.address]},
            proxy={"enabled": False},
        )
    )
    await seed.start()
    try:
        async with Client(seed.socket_path) as c:
            result = await c.download(url, tmp_path / "out.bin")
        await wait_for(lambda: finished_peers(scheduler, result.task_id), what="the seed's peer to finish")
        port = int(scheduler.address.rsplit(":", 1)[1])
        await scheduler.stop()
        scheduler = await start_scheduler(load_settings(scheduler={"port": port}))
        assert seed.host_id not in scheduler.service.state.hosts
        # no call from the test: the seed saw its connection drop, announced itself and its task
        await wait_for(
            lambda: finished_peers(scheduler, result.task_id) == [seed.host_id],
            timeout=15,
            what="the seed to announce its task to the restarted scheduler",
        )
        assert seed.host_id in scheduler.service.state.hosts
    finally:
        await seed.stop()
        await scheduler.stop()


async def test_a_seed_asked_for_a_task_it_holds_registers_it_with_the_scheduler_at_once(damselfly_origin, tmp_path):
    damselfly_origin.make("g.bin", MiB)
    url = damselfly_origin.url("g.bin")
    scheduler = await start_scheduler(load_settings())
    seed = Daemon(
        load_settings(
            host={"hostname": "held-seed"},
            daemon={"seed": True, "data_dir": str(tmp_path / "seed"), "schedulers": [scheduler.address]},
            proxy={"enabled": False},
        )
    )
    await seed.start()
    try:
        async with Client(seed.socket_path) as c:
            result = await c.download(url, tmp_path / "out.bin")
        await wait_for(lambda: finished_peers(scheduler, result.task_id), what="the seed's peer to finish")
        state = scheduler.service.state
        for pid in list(state.tasks[result.task_id].task.peer_ids):
            state.remove_peer(pid)  # the scheduler lost the seed's peer, the seed does not know it
        assert not finished_peers(scheduler, result.task_id)
        # the scheduler's seed trigger, as it sends it
        async with grpc.aio.insecure_channel(f"127.0.0.1:{seed.upload_port}") as ch:
            call = dfdaemon_pb2_grpc.DfdaemonUploadStub(ch).DownloadTask(
                dfdaemon_pb2.DownloadTaskRequest(download=DownloadRequest(url=url).to_proto(None))
            )
            async for _ in call:
                pass
        await wait_for(
            lambda: finished_peers(scheduler, result.task_id) == [seed.host_id],
            timeout=10,
            what="the seed to register the task it holds",
        )
        async with grpc.aio.insecure_channel(scheduler.address) as ch:
            known = await scheduler_pb2_grpc.SchedulerStub(ch).StatTask(
                scheduler_pb2.StatTaskRequest(task_id=result.task_id), timeout=5
            )
        assert known.peer_count == 1
    finally:
        await seed.stop()
        await scheduler.stop()
