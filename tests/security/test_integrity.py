"""Piece integrity no peer can forge.

The source reader's strong digest (sha256 or blake3) decides whether a child keeps a piece, not the
crc32 a parent sends; an OCI blob is complete only if it hashes to its own digest; the
strong digests persist; the child's connection pool is bounded.
"""

import asyncio
import hashlib
import json
import zlib
from pathlib import Path
from typing import ClassVar

import grpc
import pytest
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import SecurityConfig
from damselfly.contracts import DigestingWriter, ServedPiece, strong_of
from damselfly.core import ids, vortex
from damselfly.core.errors import DamselflyError, PieceCorrupt
from damselfly.core.piece import PieceSpan, digest, strong_digest
from damselfly.core.task import Task, TaskState
from damselfly.daemon.content import ContentCheck
from damselfly.daemon.pool import ConnectionPool
from damselfly.daemon.schedlink import PieceAuthority
from damselfly.plugins.storage.disk import META, DiskStorage
from damselfly.plugins.transport.tcp import TcpTransport
from damselfly.sdk.client import Client
from tests.helpers.liar import forge_keeping_crc32
from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
DEFAULT_DIGEST = SecurityConfig().piece_digest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def download(cluster, name: str, url: str, out: Path, **kw):
    async with Client(cluster.daemon(name)["socket"]) as c:
        return await c.download(url, out, **kw)


def test_the_forgery_keeps_its_crc32():
    data = bytes(range(256)) * (4 * MiB // 256)
    forged = forge_keeping_crc32(data, at=len(data) // 2)
    assert forged != data and forged[len(data) // 2 : len(data) // 2 + 4] == b"EVIL"
    assert sum(a != b for a, b in zip(data, forged, strict=True)) <= 8  # the payload and the 4-byte patch
    assert zlib.crc32(forged) == zlib.crc32(data)
    assert digest(forged) == digest(data)  # what the Vortex header carries cannot tell them apart
    assert strong_digest(forged) != strong_digest(data)


async def test_a_forged_piece_passes_crc32_but_not_the_strong_digest_and_nothing_is_kept(tmp_path):
    storage = DiskStorage(tmp_path)
    await storage.open()
    try:
        data = bytes(range(256)) * 256
        forged = forge_keeping_crc32(data, at=100)
        task = await storage.create(Task(id="f" * 64, content_length=len(data), piece_length=len(data)))
        span = PieceSpan(0, 0, len(data))
        writer = DigestingWriter(storage.writer(task.id, span), "sha256", 0)
        writer.write(forged[:1000])
        writer.write(forged[1000:])
        with pytest.raises(PieceCorrupt, match="expected sha256:"):
            await writer.commit(digest(data), expected_strong=strong_digest(data))
        assert task.pieces == {}  # refused before it was stored
        honest = DigestingWriter(storage.writer(task.id, span), "sha256", 0)
        honest.write(data)
        record = await honest.commit(digest(data), expected_strong=strong_digest(data))
        assert record.digest == digest(data) and strong_of(record) == strong_digest(data)
        assert await storage.read_piece(task.id, 0) == data
    finally:
        await storage.close()


async def test_the_strong_digest_survives_a_storage_reopen_and_old_metadata_still_loads(tmp_path):
    data = bytes(range(256)) * 64
    s = DiskStorage(tmp_path)
    await s.open()
    task = await s.create(Task(id="a" * 64, content_length=2 * len(data), piece_length=len(data)))
    for n in range(2):
        w = DigestingWriter(s.writer(task.id, PieceSpan(n, n * len(data), len(data))), "blake3", n)
        w.write(data)
        await w.commit(None)
    await s.finish(task.id)
    await s.close()
    # a task stored before strong digests were kept: its pieces have only a crc32
    meta = tmp_path / "tasks" / task.id / META
    old = json.loads(meta.read_text())
    old["id"] = "b" * 64
    for p in old["pieces"]:
        del p["strong"]
    (tmp_path / "tasks" / old["id"]).mkdir()
    (tmp_path / "tasks" / old["id"] / META).write_text(json.dumps(old))
    (tmp_path / "tasks" / old["id"] / "content").write_bytes(data * 2)

    again = DiskStorage(tmp_path)
    await again.open()
    try:
        reopened = again.get(task.id)
        assert reopened is not None and reopened.state is TaskState.SUCCEEDED
        assert [strong_of(p) for p in reopened.pieces.values()] == [strong_digest(data, "blake3")] * 2
        assert [p.digest for p in reopened.pieces.values()] == [digest(data)] * 2
        legacy = again.get("b" * 64)
        assert legacy is not None and [strong_of(p) for p in legacy.pieces.values()] == ["", ""]
        assert await again.read_piece(legacy.id, 1) == data
    finally:
        await again.close()


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_parent_forging_a_piece_with_its_crc32_is_refused_and_blocklisted(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", 16 * MiB)  # four pieces of 4 MiB
    forger = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.liar"]',
        "DAMSELFLY_DAEMON__STORAGE": '{"type": "forging-disk"}',
        "DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s",  # so the child picks the forger first
    }
    hook_log = tmp_path / "hooks.jsonl"
    child = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.recorder"]',
        "DAMSELFLY_TEST_HOOK_LOG": str(hook_log),
        "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "1",  # one fetch from a peer at a time: the forger's first is its last
        "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.5",  # the forger's pieces are known before the first choice
    }
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={0: {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "1MB/s"}, 1: forger, 2: child},
        env={"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"},  # the forger reads no block: the seed holds all
    )
    url = damselfly_origin.url("f.bin")
    await download(cluster, "peer1", url, tmp_path / "forger.bin")
    assert sha(tmp_path / "forger.bin") == sha(src)  # the forger stores honestly, and serves forgeries

    result = await download(cluster, "peer2", url, tmp_path / "out.bin")
    assert sha(tmp_path / "out.bin") == sha(src)
    assert result.peer_bytes == 16 * MiB and damselfly_origin.stats()["bytes"] == 16 * MiB
    assert cluster.metric("peer2", "dragonfly_dfdaemon_download_piece_failure_total", '{reason="corrupt"}') == 1
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    forger_host = cluster.daemon("peer1")["host_id"]
    failed = [c for c in calls if c["hook"] == "damselfly_piece_failed"]
    verified = [c for c in calls if c["hook"] == "damselfly_piece_verified"]
    # one forged piece was refused on its sha256 (its crc32 matched), then the forger was asked no more
    assert len(failed) == 1 and failed[0]["parent_id"].startswith(forger_host + "-")
    assert f"expected {DEFAULT_DIGEST}:" in failed[0]["reason"]
    assert sorted(c["number"] for c in verified) == [0, 1, 2, 3]
    assert not any(c["parent_id"].startswith(forger_host + "-") for c in verified)  # nothing of it was stored

    # the scheduler holds the seed's strong digest of each piece (what children check), never a crc32
    async with grpc.aio.insecure_channel(cluster.info["scheduler"]) as ch:
        task = await scheduler_pb2_grpc.SchedulerStub(ch).StatTask(
            scheduler_pb2.StatTaskRequest(task_id=result.task_id), timeout=10
        )
    data = src.read_bytes()
    assert {p.number: p.digest for p in task.pieces} == {
        n: strong_digest(data[n * 4 * MiB : (n + 1) * 4 * MiB], DEFAULT_DIGEST) for n in range(4)
    }


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_an_oci_blob_that_does_not_hash_to_its_digest_fails_and_is_deleted(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    claimed = hashlib.sha256(b"the layer the manifest names").hexdigest()
    blob = damselfly_origin.root / "v2" / "library" / "app" / "blobs" / f"sha256:{claimed}"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"something else entirely" * (300 * 1024))  # 6.6 MiB: two pieces
    url = damselfly_origin.url(f"v2/library/app/blobs/sha256:{claimed}")
    cluster = damselfly_cluster_factory(peers=1)
    out = tmp_path / "layer"
    with pytest.raises(DamselflyError, match=f"content digest mismatch: expected sha256:{claimed}"):
        await download(cluster, "peer1", url, out)
    assert not out.exists()
    for name in ("peer1", "seed"):  # neither keeps (nor serves) what does not match
        async with Client(cluster.daemon(name)["socket"]) as c:
            assert await wait_for(lambda c=c: _no_tasks(c), what=f"{name} to drop the task")

    # so does a file that is not what the user's --digest says: deleted, not left servable
    damselfly_origin.make("plain.bin", 5 * MiB)
    with pytest.raises(DamselflyError, match="content digest mismatch: expected sha256:0000"):
        await download(cluster, "peer1", damselfly_origin.url("plain.bin"), out, digest="sha256:" + "0" * 64)
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        assert await _no_tasks(c)

    # the same blob under its true digest is fine
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    (blob.parent / f"sha256:{good}").write_bytes(blob.read_bytes())
    await download(cluster, "peer1", damselfly_origin.url(f"v2/library/app/blobs/sha256:{good}"), out)
    assert sha(out) == good


async def _no_tasks(c: Client) -> bool:
    return not await c.list_tasks()


async def test_piece_digests_missing_from_the_answer_are_asked_of_the_scheduler_in_batches():
    calls = 0
    reported: dict[int, str] = {}

    async def stat() -> common_pb2.Task:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return common_pb2.Task(pieces=[common_pb2.Piece(number=n, digest=d) for n, d in reported.items()])

    authority = PieceAuthority(stat, interval=0.05, wait=2.0)
    authority.learn([common_pb2.Piece(number=0, digest="sha256:" + "0" * 64)])
    assert await authority.digest(0) == "sha256:" + "0" * 64 and calls == 0  # the answer had it
    reported.update({n: f"sha256:{n:064x}" for n in range(1, 9)})
    got = await asyncio.gather(*(authority.digest(n) for n in range(1, 9)))
    assert got == [f"sha256:{n:064x}" for n in range(1, 9)]
    assert calls == 1  # eight fetches waiting, one StatTask
    waiting = asyncio.ensure_future(authority.digest(9))  # reported later: asked again, at most every 50 ms
    await wait_for(lambda: calls >= 3, what="the scheduler to be asked again")
    reported[9] = "sha256:" + "9" * 64
    assert await waiting == "sha256:" + "9" * 64
    # a scheduler that knows no digest of the task (it learnt of it from announcements) is waited on once
    bare = PieceAuthority(_bare_task, interval=0.05, wait=0.3)
    assert await bare.digest(3) is None and bare.bare
    assert await asyncio.wait_for(bare.digest(4), 0.1) is None  # at once now
    await bare.close()
    await authority.close()


async def _bare_task() -> common_pb2.Task:
    return common_pb2.Task(pieces=[common_pb2.Piece(number=0)])


class _CountingTcp(TcpTransport):
    name: ClassVar[str] = "tcp"

    def __init__(self):
        super().__init__()
        self.connects = 0

    async def connect(self, address, timeout):
        self.connects += 1
        return await super().connect(address, timeout)


async def _lookup(task_id: str, number: int) -> ServedPiece:
    data = bytes([number]) * 1024
    meta = vortex.PieceMetadata(number, 0, len(data), digest(data), "parent")
    return ServedPiece(meta, data=data)


@pytest.mark.timeout(30)
async def test_the_connection_pool_is_capped_and_closes_idle_connections():
    servers = [await TcpTransport().serve("127.0.0.1", 0, _lookup) for _ in range(3)]
    parents = [{"tcp": f"127.0.0.1:{s.port}"} for s in servers]
    t = _CountingTcp()
    pool = ConnectionPool([t], 5, max_connections=2, idle_timeout=0.5)
    try:
        a_key, a = await pool.acquire(parents[0])
        b_key, b = await pool.acquire(parents[1])
        third = asyncio.ensure_future(pool.acquire(parents[2]))
        await asyncio.sleep(0.1)  # give it every chance: both connections are busy, the cap holds it back
        assert not third.done() and pool.size == 2
        await pool.release(a_key, a)  # idle now: closed to make room for the third parent
        c_key, c = await third
        assert pool.size == 2 and t.connects == 3
        assert a.broken  # the evicted connection is closed
        # a pooled connection still carries pieces
        assert (await c.fetch("c" * 64, 7, _Sink())).number == 7
        await pool.release(b_key, b)
        await pool.release(c_key, c)
        await wait_for(lambda: pool.size == 0, timeout=5, what="idle connections to be closed")
        assert b.broken and c.broken
        _, again = await pool.acquire(parents[1])  # a new connection, not a closed one
        assert t.connects == 4 and again is not b
    finally:
        await pool.close()
        for s in servers:
            await s.close()


class _Sink:
    def write(self, chunk):
        pass

    async def commit(self, expected_digest, *, strong=""):
        raise NotImplementedError

    def abort(self):
        pass


async def test_the_content_digest_is_hashed_in_order_as_pieces_land_reading_back_only_what_came_out_of_order():
    pieces = [bytes([n]) * 1000 for n in range(4)]
    reads: list[int] = []

    async def read_piece(n: int) -> bytes:
        reads.append(n)
        return pieces[n]

    want = "sha256:" + hashlib.sha256(b"".join(pieces)).hexdigest()
    check = ContentCheck(read_piece, 4, [want, "crc32:" + str(zlib.crc32(b"".join(pieces)))])

    def write(n: int) -> list:
        hashers = check.continuation(n)
        for h in hashers or []:
            h.update(pieces[n])  # what the piece's writer does as its bytes arrive
        return hashers

    check.landed(0, write(0))  # in order: hashed as written
    early = write(2)
    assert early is None  # piece 1 is not in yet: piece 2 will be read back
    check.landed(2, early)
    check.landed(1, write(1))
    check.landed(3, write(3))  # piece 2 is being read back: 3 will be too
    await check.verify(range(4))
    assert reads == [2, 3]  # pieces 0 and 1 were never read again

    wrong = ContentCheck(read_piece, 4, ["sha256:" + "0" * 64])
    with pytest.raises(PieceCorrupt, match="content digest mismatch: expected sha256:0000"):
        await wrong.verify(range(4))


async def test_a_seed_announcing_its_stored_tasks_gives_the_scheduler_their_strong_digests(damselfly_origin, tmp_path):
    """A scheduler that lost a task (restart, failover) learns its pieces' strong digests again
    from the seed's re-announcement, so children can check what the seed serves."""
    from damselfly.config import load_settings
    from damselfly.daemon.daemon import Daemon
    from damselfly.scheduler import start_scheduler

    damselfly_origin.make("f.bin", 3 * MiB + 5)
    url = damselfly_origin.url("f.bin")
    scheduler = await start_scheduler(load_settings())
    seed = Daemon(
        load_settings(
            host={"hostname": "announce-seed"},
            daemon={"seed": True, "data_dir": str(tmp_path / "seed"), "schedulers": [scheduler.address]},
            proxy={"enabled": False},
        )
    )
    await seed.start()
    try:
        async with Client(seed.socket_path) as c:
            result = await c.download(url, tmp_path / "out.bin", piece_length=MiB)
        task = seed.storage.get(result.task_id)
        assert task is not None and len(task.pieces) == 4
        stored = {n: strong_of(r) for n, r in task.pieces.items()}
        assert all(d.startswith(f"{DEFAULT_DIGEST}:") for d in stored.values())
        # the scheduler restarts, on the same address, knowing nothing
        port = int(scheduler.address.rsplit(":", 1)[1])
        await scheduler.stop()
        scheduler = await start_scheduler(load_settings(scheduler={"port": port}))
        assert task.id not in scheduler.service.state.tasks
        ok, _ = await seed.schedulers.announce_host(seed.host_proto(), 60)  # what its announce loop does
        assert ok
        assert await seed.announce_finished(task)
        async with grpc.aio.insecure_channel(scheduler.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            known = await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id=seed.host_id, task_id=task.id))
        assert {p.number: p.digest for p in known.pieces} == stored
    finally:
        await seed.stop()
        await scheduler.stop()


@pytest.mark.parametrize(
    "request_fields",
    [
        {},
        {"piece_length": 4 * MiB, "tag": "t", "application": "a"},
        {"filtered_query_params": ["sig"]},
        {"use_blob_digest": True},
        {"content_for_calculating_task_id": "damselfly-cache://x"},
        {
            "content_for_calculating_task_id": ids.bound_blob_content(
                "http",
                "reg.example:5000",
                ids.parse_blob_url("http://reg.example:5000/v2/team/app/blobs/sha256:" + "ab" * 32),
            )
        },
    ],
)
def test_a_stored_task_is_announced_under_the_task_id_it_was_fetched_under(request_fields):
    from damselfly.daemon.daemon import announce_request
    from damselfly.daemon.request import DownloadRequest

    url = "http://reg.example:5000/v2/team/app/blobs/sha256:" + "ab" * 32 + "?sig=1"
    if request_fields.get("content_for_calculating_task_id", "").startswith("damselfly-cache://"):
        url = request_fields["content_for_calculating_task_id"]
    if request_fields.get("content_for_calculating_task_id", "").startswith("oci-blob"):
        url = url.split("?")[0]
    req = DownloadRequest(url=url, **request_fields)
    task = Task(
        id=req.task_id(),
        url=url,
        piece_length=req.piece_length or 4 * MiB,
        content_length=10,
        tag=req.tag,
        application=req.application,
        filtered_query_params=list(req.filtered_query_params),
    )
    again = announce_request(task)
    assert again is not None and again.task_id() == task.id
    assert announce_request(Task(id="0" * 64, url=url)) is None
