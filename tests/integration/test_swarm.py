"""A real swarm on 127.0.0.1: a scheduler, a seed and peers as separate processes."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from damselfly.core.errors import DamselflyError, InvalidArgument
from damselfly.sdk.client import Client
from damselfly.testing import OriginProcess
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def download(cluster, name: str, url: str, out: Path, **kw):
    async with Client(cluster.daemon(name)["socket"]) as c:
        return await c.download(url, out, **kw)


async def test_five_peers_one_origin_read(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("blob.bin", 64 * MiB)
    cluster = damselfly_cluster_factory(peers=5)
    damselfly_origin.reset()
    url = damselfly_origin.url("blob.bin")
    results = await asyncio.gather(*(download(cluster, f"peer{i}", url, tmp_path / f"out{i}") for i in range(1, 6)))
    stats = damselfly_origin.stats()
    assert stats["bytes"] == src.stat().st_size  # the origin sent the file exactly once
    # one stat; the read is shared (by default) between the seed and the peers waiting for it,
    # each reading its block of pieces in one request
    readers = 1 + sum(r.source_bytes > 0 for r in results)
    assert readers >= 2 and stats["by_method"] == {"HEAD": 1, "GET": readers}
    want = sha(src)
    assert all(sha(tmp_path / f"out{i}") == want for i in range(1, 6))
    assert all(r.source_bytes + r.peer_bytes == 64 * MiB for r in results)
    seed_read = cluster.metric(
        "seed", "dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}'
    )
    assert seed_read > 0 and seed_read + sum(r.source_bytes for r in results) == 64 * MiB
    # every daemon announced itself with its real load
    async with grpc.aio.insecure_channel(cluster.info["scheduler"]) as ch:
        hosts = (await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(scheduler_pb2.ListHostsRequest())).hosts
    assert {h.id for h in hosts} == {d["host_id"] for d in cluster.daemons}
    for h in hosts:
        assert h.cpu.logical_count >= 1 and h.memory.total > 0 and h.disk.total > 0
        assert h.port == int(cluster.daemon(h.hostname.rsplit("-", 1)[-1])["upload"].rsplit(":", 1)[1])
        assert h.type == (1 if h.id.endswith("-seed") else 0)
    # a second download on a peer is served from its own disk
    again = await download(cluster, "peer3", url, tmp_path / "again")
    assert again.local_bytes == 64 * MiB and damselfly_origin.stats()["bytes"] == stats["bytes"]


async def test_pieces_come_from_several_parents_at_once(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("f.bin", 64 * MiB)
    cluster = damselfly_cluster_factory(peers=2, peer_env={2: {"DAMSELFLY_DAEMON__PIECE_PICKER": "rarest-first"}})
    url = damselfly_origin.url("f.bin")
    await download(cluster, "peer1", url, tmp_path / "a.bin")
    result = await download(cluster, "peer2", url, tmp_path / "b.bin")
    assert sha(tmp_path / "b.bin") == sha(src)
    # two finished parents with equal free upload: each of the 16 pieces picks one at random
    # a peer id is {ip}-{hostname}-{uuid4}, plus -seed on a seed: strip to {ip}-{hostname}
    owners = {pid.removesuffix("-seed").rsplit("-", 5)[0] for pid in result.bytes_by_parent}
    assert len(result.bytes_by_parent) == 2, result.bytes_by_parent
    assert all(n > 0 for n in result.bytes_by_parent.values())
    assert sum(result.bytes_by_parent.values()) == 64 * MiB
    assert owners == {cluster.daemon("seed")["host_id"].removesuffix("-seed"), cluster.daemon("peer1")["host_id"]}


async def test_a_parent_killed_mid_transfer(tmp_path, damselfly_cluster_factory):
    origin = OriginProcess(tmp_path / "slow", rate="24MB/s")
    try:
        src = origin.make("f.bin", 64 * MiB)
        cluster = damselfly_cluster_factory(peers=3)
        url = origin.url("f.bin")
        tasks = [asyncio.ensure_future(download(cluster, f"peer{i}", url, tmp_path / f"o{i}")) for i in (1, 2, 3)]
        metric = "dragonfly_dfdaemon_download_traffic_bytes_total"
        await wait_for(
            lambda: cluster.metric("peer1", metric, '{traffic_type="remote_peer"}') >= 8 * MiB,
            what="peer1 to hold pieces",
        )
        cluster.stop_daemon("peer1", kill=True)
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[0], DamselflyError)  # its own client sees the daemon die
        for i in (2, 3):
            assert not isinstance(done[i - 1], BaseException), done[i - 1]
            assert sha(tmp_path / f"o{i}") == sha(src)
        # each piece was read once, but for those peer1 had read and nobody held yet when it
        # died (its block is 16 MiB of the 4 readers'): the seed reads them again
        assert 64 * MiB <= origin.stats()["bytes"] <= 64 * MiB + 16 * MiB + 4 * MiB
    finally:
        origin.stop()


async def test_scheduler_stopped_get_finishes_from_source(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("f.bin", 12 * MiB)
    cluster = damselfly_cluster_factory(peers=1)
    cluster.stop_scheduler()
    out = tmp_path / "out.bin"
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "damselfly",
            "get",
            damselfly_origin.url("f.bin"),
            "-O",
            str(out),
            "--socket",
            cluster.daemon("peer1")["socket"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(src)
    assert "no scheduler answered" in cluster.log("peer1")


async def test_corrupt_piece_is_detected_and_fetched_elsewhere(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("f.bin", 32 * MiB)
    liar = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.liar"]',
        "DAMSELFLY_DAEMON__STORAGE": '{"type": "lying-disk"}',
        "DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s",  # so the child picks the liar first
    }
    hook_log = tmp_path / "hooks.jsonl"
    recorder = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.recorder"]',
        "DAMSELFLY_TEST_HOOK_LOG": str(hook_log),
        # both parents' pieces are known before any is chosen (else the seed's arrive first, and
        # may be all it asks for): the liar is then asked for about half of them
        "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.5",
    }
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={0: {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "1MB/s"}, 1: liar, 2: recorder},
        env={
            "DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"
        },  # the liar reads no block of its own: the seed holds every piece
    )
    url = damselfly_origin.url("f.bin")
    await download(cluster, "peer1", url, tmp_path / "liar.bin")
    assert sha(tmp_path / "liar.bin") == sha(src)  # the liar stores honestly
    result = await download(cluster, "peer2", url, tmp_path / "out.bin")
    assert sha(tmp_path / "out.bin") == sha(src)
    assert result.peer_bytes == 32 * MiB
    failures = cluster.metric("peer2", "dragonfly_dfdaemon_download_piece_failure_total", '{reason="corrupt"}')
    assert failures >= 1
    assert "bad piece" in cluster.log("peer2")
    assert damselfly_origin.stats()["bytes"] == 32 * MiB
    # the behaviour hooks saw it all, as a third-party plugin would
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    failed = [c for c in calls if c["hook"] == "damselfly_piece_failed"]
    verified = [c for c in calls if c["hook"] == "damselfly_piece_verified"]
    finished = [c for c in calls if c["hook"] == "damselfly_task_finished"]
    assert failed and all(c["parent_id"].startswith(cluster.daemon("peer1")["host_id"]) for c in failed)
    assert sorted(c["number"] for c in verified) == list(range(8))
    assert not any(c["parent_id"].startswith(cluster.daemon("peer1")["host_id"]) for c in verified)
    assert finished == [
        {
            "hook": "damselfly_task_finished",
            "task_id": result.task_id,
            "url": url,
            "content_length": 32 * MiB,
            "peer_bytes": 32 * MiB,
            "source_bytes": 0,
        }
    ]


async def test_finished_tasks_survive_a_restart(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("f.bin", 16 * MiB)
    cluster = damselfly_cluster_factory(peers=2)
    url = damselfly_origin.url("f.bin")
    first = await download(cluster, "peer1", url, tmp_path / "a.bin")
    cluster.stop_daemon("seed")
    cluster.stop_daemon("peer1")
    cluster.restart_daemon("peer1")
    damselfly_origin.reset()

    async with Client(cluster.daemon("peer2")["socket"]) as c:

        async def known() -> bool:
            try:
                return (await c.stat_task(first.task_id)).peer_count >= 1
            except DamselflyError:
                return False

        await wait_for(known, what="the restarted peer to announce its task")
        result = await c.download(url, tmp_path / "b.bin")
    assert sha(tmp_path / "b.bin") == sha(src)
    assert result.peer_bytes == 16 * MiB
    assert damselfly_origin.stats()["bytes"] == 0


async def test_whole_file_digest(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("f.bin", 5 * MiB)
    cluster = damselfly_cluster_factory(peers=1)
    url = damselfly_origin.url("f.bin")
    good = f"sha256:{sha(src)}"
    await download(cluster, "peer1", url, tmp_path / "ok.bin", digest=good)
    assert sha(tmp_path / "ok.bin") == sha(src)
    with pytest.raises(DamselflyError, match="digest mismatch"):
        await download(cluster, "peer1", url, tmp_path / "bad.bin", digest="sha256:" + "0" * 64, tag="other")
    assert not (tmp_path / "bad.bin").exists()
    # the bad content is not kept: only the good task is listed, and it can be removed
    sock = cluster.daemon("peer1")["socket"]

    async def cli(*args: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "damselfly", "tasks", *args, "--socket", sock],
            capture_output=True,
            text=True,
            timeout=30,
        )

    rows = [json.loads(line) for line in (await cli("ls", "--json")).stdout.splitlines()]
    assert [(r["content_length"], r["finished"]) for r in rows] == [(5 * MiB, True)]
    assert (await cli("rm", rows[0]["task_id"])).returncode == 0
    assert (await cli("ls", "--json")).stdout.strip() == ""


def run_get(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "damselfly",
            "get",
            *args,
            "--socket",
            cluster.daemon("peer1")["socket"],
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_get_errors_are_one_line_and_leave_nothing(damselfly_origin, damselfly_cluster_factory, tmp_path):
    cluster = damselfly_cluster_factory(peers=1)
    out = tmp_path / "out" / "x.bin"
    out.parent.mkdir()
    for url, needle in [
        ("gopher://example/x", "no source plugin handles gopher://"),
        ("http://[::1/x", "invalid url"),
        ("http://", "is not a url"),
        (damselfly_origin.url("missing.bin"), "404"),
        ("http://127.0.0.1:9/unreachable", "cannot reach origin"),
    ]:
        proc = run_get(cluster, url, "-O", str(out))
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("damselfly: error:") and needle in lines[0], proc.stderr
        assert list(out.parent.iterdir()) == []
    proc = run_get(cluster, damselfly_origin.url("x"), "-O", str(tmp_path / "no" / "such" / "dir"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_cluster_up_and_down_cli(tmp_path):
    d = tmp_path / "c"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
    up = subprocess.run(
        [sys.executable, "-m", "damselfly", "cluster", "up", "--peers", "2", "--dir", str(d)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert up.returncode == 0, up.stderr
    info = json.loads((d / "cluster.json").read_text())
    assert info["scheduler"].startswith("127.0.0.1:")
    assert [x["seed"] for x in info["daemons"]] == [True, False, False]
    for x in info["daemons"]:
        assert set(x) >= {"host_id", "pid", "seed", "socket", "upload", "piece_port", "proxy"}
        assert Path(x["socket"]).exists()
    down = subprocess.run(
        [sys.executable, "-m", "damselfly", "cluster", "down", "--dir", str(d)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert down.returncode == 0 and "stopped 4" in down.stdout
    for pid in [x["pid"] for x in info["daemons"]] + [info["scheduler_pid"]]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_daemon_without_room_says_so(damselfly_origin, damselfly_cluster_factory, tmp_path):
    damselfly_origin.make("f.bin", 8 * MiB)
    no_room = {"DAMSELFLY_DAEMON__STORAGE": json.dumps({"type": "disk", "min_free_bytes": 1 << 60})}
    cluster = damselfly_cluster_factory(peers=1, peer_env={1: no_room})
    out = tmp_path / "x.bin"
    proc = run_get(cluster, damselfly_origin.url("f.bin"), "-O", str(out))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space" in lines[0], proc.stderr
    assert not out.exists()


async def test_ranged_downloads_fetch_only_the_pieces_they_overlap(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", 64 * MiB)  # 16 pieces of 4 MiB
    data = src.read_bytes()
    cluster = damselfly_cluster_factory(peers=2)
    url = damselfly_origin.url("f.bin")
    # 2 MiB from the middle of piece 1: the origin sends piece 1 only, to the seed
    r1 = await download(cluster, "peer1", url, tmp_path / "r1", byte_range=(5 * MiB, 2 * MiB))
    assert (tmp_path / "r1").read_bytes() == data[5 * MiB : 7 * MiB]
    assert damselfly_origin.stats()["bytes"] == 4 * MiB
    assert r1.peer_bytes == 4 * MiB and r1.source_bytes == 0
    # a range inside it, on another peer: nothing more from the origin
    r2 = await download(cluster, "peer2", url, tmp_path / "r2", byte_range=(5 * MiB + 10, 100))
    assert (tmp_path / "r2").read_bytes() == data[5 * MiB + 10 : 5 * MiB + 110]
    assert damselfly_origin.stats()["bytes"] == 4 * MiB and r2.source_bytes == 0
    # a range across a piece boundary, on a peer that holds one of the two pieces
    r3 = await download(cluster, "peer1", url, tmp_path / "r3", byte_range=(8 * MiB - 3, 6))
    assert (tmp_path / "r3").read_bytes() == data[8 * MiB - 3 : 8 * MiB + 3]
    assert r3.local_bytes == 4 * MiB and r3.peer_bytes == 4 * MiB
    assert damselfly_origin.stats()["bytes"] == 8 * MiB
    # the whole file at last: the origin has sent each byte exactly once
    full = await download(cluster, "peer2", url, tmp_path / "full")
    assert sha(tmp_path / "full") == sha(src)
    assert damselfly_origin.stats()["bytes"] == 64 * MiB  # the rest read once, shared with the seed
    assert full.source_bytes + full.peer_bytes + full.local_bytes == 64 * MiB
    # a range outside the content is a clear error
    with pytest.raises(DamselflyError, match="outside the content"):
        await download(cluster, "peer2", url, tmp_path / "bad", byte_range=(64 * MiB, 10))


async def test_a_seed_reads_a_whole_task_in_one_request_with_pieces_below_4_mib(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("small-pieces.bin", 12 * MiB + 5)
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={0: {"DAMSELFLY_DAEMON__SOURCE_CONCURRENT_PIECES": "1"}},
        env={"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"},  # the seed reads it all
    )
    damselfly_origin.reset()
    url = damselfly_origin.url("small-pieces.bin")
    results = await asyncio.gather(
        *(download(cluster, f"peer{i}", url, tmp_path / f"s{i}", piece_length=1 * MiB) for i in (1, 2))
    )
    stats = damselfly_origin.stats()
    assert stats["by_method"] == {"HEAD": 1, "GET": 1}  # 13 pieces of 1 MiB, one long read
    assert stats["bytes"] == src.stat().st_size
    assert all(sha(tmp_path / f"s{i}") == sha(src) for i in (1, 2))
    assert all(r.peer_bytes == src.stat().st_size for r in results)
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        with pytest.raises(InvalidArgument, match="outside"):
            await c.download(url, tmp_path / "tiny", piece_length=1024)


@pytest.mark.timeout(120)
async def test_endgame_takes_a_stalled_piece_from_another_parent(damselfly_origin, damselfly_cluster_factory, tmp_path):
    src = damselfly_origin.make("eg.bin", 8 * MiB)  # two pieces
    staller = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.liar"]',
        "DAMSELFLY_DAEMON__STORAGE": '{"type": "stalling-disk"}',
        "DAMSELFLY_TEST_STALL_SECONDS": "600",
        "DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s",  # the child asks it first
    }
    hook_log = tmp_path / "hooks.jsonl"
    child = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.recorder"]',
        "DAMSELFLY_TEST_HOOK_LOG": str(hook_log),
        "DAMSELFLY_DAEMON__ENDGAME_DUPLICATES": "1",
        "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "3",
        "DAMSELFLY_DAEMON__PIECE_TIMEOUT": "600",  # only the endgame can get it done before the test's timeout
    }
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={0: {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "1MB/s"}, 1: staller, 2: child},
        env={
            "DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"
        },  # the staller reads no block of its own: the seed holds both pieces
    )
    url = damselfly_origin.url("eg.bin")
    await download(cluster, "peer1", url, tmp_path / "staller.bin")  # it stores honestly, from the seed
    result = await download(cluster, "peer2", url, tmp_path / "out.bin")
    assert sha(tmp_path / "out.bin") == sha(src)
    assert result.peer_bytes == 8 * MiB
    assert cluster.metric("peer2", "dragonfly_dfdaemon_endgame_piece_total") >= 1
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    verified = [c for c in calls if c["hook"] == "damselfly_piece_verified"]
    assert sorted(c["number"] for c in verified) == [0, 1]  # each stored once, the losers dropped
    staller_host = cluster.daemon("peer1")["host_id"]
    assert not any(c["parent_id"].startswith(staller_host + "-") for c in verified)  # both came from the seed
    assert damselfly_origin.stats()["bytes"] == 8 * MiB


async def test_a_shared_source_read_fetches_every_piece_from_the_origin_once(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("shared.bin", 24 * MiB + 3)
    cluster = damselfly_cluster_factory(
        peers=3,
        env={"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "true", "DAMSELFLY_SCHEDULER__STRATEGY": "swarm"},
        peer_env={3: {"DAMSELFLY_DAEMON__DISABLE_BACK_TO_SOURCE": "true"}},  # offers no share
    )
    damselfly_origin.reset()
    url = damselfly_origin.url("shared.bin")
    results = await asyncio.gather(
        *(download(cluster, f"peer{i}", url, tmp_path / f"sh{i}", piece_length=1 * MiB) for i in (1, 2, 3))
    )
    size = src.stat().st_size
    assert damselfly_origin.stats()["bytes"] == size  # each piece read once, by whoever it was handed to
    assert all(sha(tmp_path / f"sh{i}") == sha(src) for i in (1, 2, 3))
    seed_read = cluster.metric(
        "seed", "dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}'
    )
    assert seed_read + sum(r.source_bytes for r in results) == size
    assert all(r.source_bytes + r.peer_bytes == size for r in results)
    assert results[2].source_bytes == 0
