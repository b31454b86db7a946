"""Fault scenarios on a real cluster: a part fails mid-download, and every output is still whole.

Each scenario checks the output byte for byte against the origin's file, and that nothing
half-written is left in the output directory (no partial output, no temp files). Files are
4 MiB in 256 KiB pieces and uploads are throttled, so a fault lands while pieces are in flight.
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from damselfly.core.errors import DamselflyError
from damselfly.sdk.client import Client, DownloadResult, Progress
from damselfly.testing import OriginProcess, faults
from damselfly.testing.faults import FaultProxy, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 4 * MiB
PIECE = 256 * 1024
SLOW = {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "2MB/s"}  # a 256 KiB piece takes about an eighth of a second
# The seed reads every piece, so the others hold all a lost parent held. With source shares, a
# peer that read its share from the origin is the only holder of those pieces: when it stalls,
# its children wait for a new schedule (about 90 s, seen here) before they go to the source;
# so do they for the pieces of a source share cut mid-stream.
SEED_HOLDS_ALL = {"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"}


def assert_whole(out: Path, src: Path) -> None:
    """``out`` is byte for byte ``src``, and alone in its directory (no temp file left behind)."""
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def outputs(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name / "out.bin"


async def download(
    cluster, name: str, url: str, out: Path, on_progress: Callable[[Progress], object] | None = None
) -> DownloadResult:
    async with Client(cluster.daemon(name)["socket"]) as c:
        return await c.download(url, out, piece_length=PIECE, on_progress=on_progress)


def when_parent_serves(host_id: str, act: Callable[[], None]) -> Callable[[Progress], None]:
    """A progress callback that calls ``act`` once, when the first bytes from ``host_id`` arrived."""
    done = False

    def check(p: Progress) -> None:
        nonlocal done
        if not done and any(peer.startswith(host_id + "-") and n for peer, n in p.bytes_by_parent.items()):
            done = True
            act()

    return check


def when_done(at_least: int, act: Callable[[], None]) -> Callable[[Progress], None]:
    """A progress callback that calls ``act`` once, when at least ``at_least`` bytes are done."""
    done = False

    def check(p: Progress) -> None:
        nonlocal done
        if not done and p.done_bytes >= at_least:
            done = True
            act()

    return check


async def test_a_parent_killed_mid_piece_leaves_the_child_to_finish_from_the_others(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", SIZE)
    url = damselfly_origin.url("f.bin")
    # peer1 uploads faster than the seed, so the child asks it first (once it knows its pieces)
    parent_env = {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "4MB/s"}
    child = {"DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.5"}
    cluster = damselfly_cluster_factory(peers=2, peer_env={0: SLOW, 1: parent_env, 2: child}, env=SEED_HOLDS_ALL)
    await download(cluster, "peer1", url, outputs(tmp_path, "first"))
    parent = cluster.daemon("peer1")
    killed: list[int] = []

    def kill() -> None:
        faults.kill(int(parent["pid"]))
        killed.append(1)

    out = outputs(tmp_path, "child")
    result = await download(cluster, "peer2", url, out, when_parent_serves(parent["host_id"], kill))
    assert killed  # the parent served, and died while the child still needed pieces
    assert_whole(out, src)
    assert result.peer_bytes + result.source_bytes == SIZE


async def test_a_parent_stalled_mid_piece_is_given_up_after_the_piece_timeout_and_others_finish(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", SIZE)
    url = damselfly_origin.url("f.bin")
    # the child gives a parent 3 s a piece (the default is 60 s: a SIGSTOPped parent holds its
    # pieces that long), so the stalled parent's pieces go to the seed within about 3 s
    child = {"DAMSELFLY_DAEMON__PIECE_TIMEOUT": "3", "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.5"}
    fast = {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s"}  # so the child asks peer1 first
    cluster = damselfly_cluster_factory(peers=2, peer_env={0: SLOW, 1: fast, 2: child}, env=SEED_HOLDS_ALL)
    await download(cluster, "peer1", url, outputs(tmp_path, "first"))
    parent = cluster.daemon("peer1")
    pid = int(parent["pid"])
    stopped: list[str] = []

    def stall() -> None:
        faults.stop(pid)
        stopped.append(faults.process_state(pid))

    out = outputs(tmp_path, "child")
    try:
        result = await download(cluster, "peer2", url, out, when_parent_serves(parent["host_id"], stall))
        assert stopped and faults.process_state(pid) == "T"  # frozen after it served, and all along
    finally:
        faults.cont(pid)
    assert_whole(out, src)
    assert result.peer_bytes + result.source_bytes == SIZE


async def test_the_seed_killed_mid_download_leaves_the_child_to_finish(damselfly_cluster_factory, tmp_path):
    origin = OriginProcess(tmp_path / "origin", rate="2MB/s")  # the seed is still reading when it dies
    try:
        src = origin.make("f.bin", SIZE)
        url = origin.url("f.bin")
        cluster = damselfly_cluster_factory(peers=1)
        seed = int(cluster.daemon("seed")["pid"])
        out = outputs(tmp_path, "child")
        await download(cluster, "peer1", url, out, when_done(MiB, lambda: faults.kill(seed)))
        assert_whole(out, src)
        assert next(p.popen for p in cluster.procs if p.popen.pid == seed).wait(10) == -9  # it did die
    finally:
        origin.stop()


def recorded_pieces(data_dir: Path) -> dict[str, list[int]]:
    """The pieces each task's metadata in a daemon's ``data_dir`` records, by task id."""
    metas = (json.loads(m.read_text()) for m in data_dir.glob("tasks/*/meta.json"))
    return {m["id"]: sorted(p["number"] for p in m["pieces"]) for m in metas}


async def test_a_child_killed_mid_download_resumes_from_its_recorded_pieces_after_a_restart(
    damselfly_cluster_factory, tmp_path
):
    origin = OriginProcess(tmp_path / "origin", rate="2MB/s")
    try:
        src = origin.make("f.bin", SIZE)
        url = origin.url("f.bin")
        cluster = damselfly_cluster_factory(peers=1, seed=False)  # the child reads from the origin itself
        pid = int(cluster.daemon("peer1")["pid"])
        out = outputs(tmp_path, "child")
        # killed late enough that a metadata save (every daemon.storage persist_interval, 1 s) landed
        with pytest.raises(DamselflyError):
            await download(cluster, "peer1", url, out, when_done(SIZE - 2 * PIECE, lambda: faults.kill(pid)))
        before = origin.stats()["bytes"]
        assert before < SIZE  # killed mid-download
        assert list(out.parent.iterdir()) == []  # no partial output, no temp file
        [kept] = recorded_pieces(cluster.directory / "peer1").values()
        assert kept  # some verified pieces were on record when it died
        cluster.restart_daemon("peer1")
        result = await download(cluster, "peer1", url, out)
        assert_whole(out, src)
        # what it had on record it keeps (and serves itself); it reads only the rest again
        assert result.local_bytes == len(kept) * PIECE
        assert origin.stats()["bytes"] - before == result.source_bytes == SIZE - len(kept) * PIECE
    finally:
        origin.stop()


async def test_the_origin_cut_mid_stream_is_read_again_and_the_output_is_whole(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", SIZE)
    async with FaultProxy("127.0.0.1", damselfly_origin.port) as proxy:
        proxy.down.cut_after = MiB + 1000  # the seed's read of the origin stops mid-piece, once
        proxy.down.cut_once = True
        url = f"http://{proxy.address}/f.bin"
        # the seed reads the whole task (a cut source share is not read again by anyone: see above)
        cluster = damselfly_cluster_factory(peers=1, env=SEED_HOLDS_ALL)
        out = outputs(tmp_path, "child")
        await download(cluster, "peer1", url, out)
    assert_whole(out, src)
    assert proxy.counters.cuts == 1


async def test_a_parent_whose_piece_bytes_are_flipped_on_the_wire_is_refused_and_the_output_is_whole(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("f.bin", SIZE)
    url = damselfly_origin.url("f.bin")
    piece_port, upload_port = free_port("127.0.0.1", "127.0.0.2"), free_port("127.0.0.1", "127.0.0.2")
    # peers reach peer1 at 127.0.0.2, where the proxies sit; peer1 itself listens on 127.0.0.1
    behind = {
        "DAMSELFLY_HOST__IP": "127.0.0.2",
        "DAMSELFLY_DAEMON__PIECE_PORT": str(piece_port),
        "DAMSELFLY_DAEMON__UPLOAD_PORT": str(upload_port),
        "DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s",  # so the child asks it first
    }
    child = {
        "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "1",  # one piece at a time from a peer
        "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.5",  # peer1's pieces are known before the first choice
    }
    async with (
        FaultProxy("127.0.0.1", piece_port, listen_host="127.0.0.2", port=piece_port) as pieces,
        FaultProxy("127.0.0.1", upload_port, listen_host="127.0.0.2", port=upload_port),
    ):
        cluster = damselfly_cluster_factory(
            peers=2,
            peer_env={0: {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "1MB/s"}, 1: behind, 2: child},
            env=SEED_HOLDS_ALL,
        )
        await download(cluster, "peer1", url, outputs(tmp_path, "first"))
        pieces.down.flips.update({1000, 100_000})  # inside the first piece each connection carries
        out = outputs(tmp_path, "child")
        result = await download(cluster, "peer2", url, out)
        assert pieces.counters.down_bytes > 1000  # the flipped bytes did reach the child
    assert_whole(out, src)
    assert result.peer_bytes == SIZE and damselfly_origin.stats()["bytes"] == SIZE
    assert cluster.metric("peer2", "dragonfly_dfdaemon_download_piece_failure_total", '{reason="corrupt"}') >= 1
