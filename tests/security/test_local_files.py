"""Issue 25, a node's own files: a ``file://`` task is read by its own node alone, never
announced to the scheduler, never served to another host (upload API or Vortex piece server),
and the storage that holds it is private to the daemon's user."""

import stat
from pathlib import Path

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core.errors import DamselflyError, NotFound
from damselfly.plugins.transport.tcp import TcpTransport
from damselfly.rpc.wire import download_task_id
from damselfly.scheduler import start_scheduler
from damselfly.sdk.client import Client
from damselfly.testing.transport import Collector
from tests.helpers.daemons import daemon
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

SECRET = b"root:$6$private-hash-of-node-a:19000:0:99999:7:::\n" * 100


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_file_task_stays_on_its_node_and_its_storage_is_private(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    url = secret.as_uri()
    sched = await start_scheduler(load_settings(scheduler={"retry_interval": 0.05, "seed_trigger": False}))
    try:
        cfg = {"schedulers": [sched.address]}
        async with daemon(tmp_path, "a", daemon=cfg) as a, daemon(tmp_path, "b", daemon=cfg) as b:
            await wait_for(lambda: {a.host_id, b.host_id} <= set(sched.service.state.hosts), what="hosts announced")
            async with Client(a.socket_path) as ca:
                await ca.download(url, tmp_path / "a.out")
            assert (tmp_path / "a.out").read_bytes() == SECRET
            (task,) = [t for t in a.storage.tasks() if t.url == url]
            assert task.pieces, "node A holds the file's pieces"
            assert task.id not in sched.service.state.tasks  # never announced

            # node B asks for the same file url, peers only: nothing comes from A
            async with Client(b.socket_path) as cb:
                with pytest.raises(DamselflyError) as err:
                    await cb.download(url, tmp_path / "b.out", disable_back_to_source=True)
            assert "\n" not in str(err.value)
            assert not (tmp_path / "b.out").exists() and b.storage.get(task.id) is None

            # any member asking A's piece server (Vortex over TCP) for the task's pieces is refused
            conn = await TcpTransport().connect(a.piece_addresses["tcp"], 5)
            try:
                with pytest.raises(NotFound):
                    await conn.fetch(task.id, 0, Collector(task.piece_length))
            finally:
                await conn.close()

            # and A's upload API does not know it
            async with grpc.aio.insecure_channel(f"127.0.0.1:{a.upload_port}") as channel:
                up = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as stat_err:
                    await up.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=task.id), timeout=10)
                assert stat_err.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as sync_err:
                    async for _ in up.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(task_id=task.id), timeout=10):
                        pass
                assert sync_err.value.code() == grpc.StatusCode.NOT_FOUND

            # A's storage is private: 0700 directories, 0600 files
            root = a.storage.root
            task_dir = root / task.id
            assert _mode(root) == 0o700 and _mode(task_dir) == 0o700
            files = [p for p in task_dir.iterdir() if p.is_file()]
            assert files and all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}
    finally:
        await sched.stop()


async def test_the_scheduler_refuses_to_register_a_file_task():
    sched = await start_scheduler(load_settings(scheduler={"seed_trigger": False}))
    try:
        async with grpc.aio.insecure_channel(sched.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            host = common_pb2.Host(id="127.0.0.1-a", type=0, hostname="a", ip="127.0.0.1", port=4000)
            await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host))
            download = common_pb2.Download(url="file:///etc/shadow")
            call = stub.AnnouncePeer()
            await call.write(
                scheduler_pb2.AnnouncePeerRequest(
                    host_id=host.id,
                    task_id=download_task_id(download),
                    peer_id="pa",
                    register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download),
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "file://" in err.value.details()
        assert download_task_id(download) not in sched.service.state.tasks
    finally:
        await sched.stop()


async def test_an_existing_store_is_made_private_when_opened(tmp_path):
    async with daemon(tmp_path, "a") as a:
        src = tmp_path / "f.bin"
        src.write_bytes(b"x" * 1000)
        async with Client(a.socket_path) as c:
            await c.download(src.as_uri(), tmp_path / "out")
        (task,) = a.storage.tasks()
        task_dir = a.storage.root / task.id
    # as an older version left it: world-readable
    a.storage.root.chmod(0o755)
    task_dir.chmod(0o755)
    for p in task_dir.iterdir():
        p.chmod(0o644)
    async with daemon(tmp_path, "a") as again:
        assert again.storage.get(task.id) is not None
        assert _mode(again.storage.root) == 0o700 and _mode(task_dir) == 0o700
        assert all(_mode(p) == 0o600 for p in task_dir.iterdir())
