"""A parent that accepts a piece request and never answers: the fetch is given up after
``stall_timeout`` and the piece taken from another holder; the piece timeline says so."""

import hashlib
import json
from pathlib import Path

import pytest

from damselfly.core.errors import DamselflyError
from damselfly.sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


async def test_a_stalled_parents_piece_comes_from_another_holder_after_the_stall_timeout(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("stall.bin", 8 * MiB)  # two pieces
    staller = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.liar"]',
        "DAMSELFLY_DAEMON__STORAGE": '{"type": "stalling-disk"}',
        "DAMSELFLY_TEST_STALL_SECONDS": "600",  # it takes the request and sends nothing
        "DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "100GB/s",  # the child asks it first
    }
    hook_log = tmp_path / "hooks.jsonl"
    child = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.recorder"]',
        "DAMSELFLY_TEST_HOOK_LOG": str(hook_log),
        "DAMSELFLY_DAEMON__ENDGAME_DUPLICATES": "0",  # only the stall check can get the piece elsewhere
        "DAMSELFLY_DAEMON__STALL_TIMEOUT": "1",
        "DAMSELFLY_DAEMON__PIECE_TIMEOUT": "600",
        "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "2",  # both parents are heard before a piece is asked for
    }
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={0: {"DAMSELFLY_HOST__MAX_TX_BANDWIDTH": "1MB/s"}, 1: staller, 2: child},
        env={"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"},  # the seed holds both pieces
    )
    url = damselfly_origin.url("stall.bin")
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        await c.download(url, tmp_path / "staller.bin")  # it stores honestly, from the seed
    async with Client(cluster.daemon("peer2")["socket"]) as c:
        result = await c.download(url, tmp_path / "out.bin")
        timeline = await c.task_timeline(result.task_id)
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    staller_host = cluster.daemon("peer1")["host_id"]
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    stalls = [c for c in calls if c["hook"] == "damselfly_piece_failed" and c["reason"].startswith("stalled: ")]
    assert stalls and all(c["parent_id"].startswith(staller_host + "-") for c in stalls)
    verified = [c for c in calls if c["hook"] == "damselfly_piece_verified"]
    assert sorted(c["number"] for c in verified) == [0, 1]
    assert not any(c["parent_id"].startswith(staller_host + "-") for c in verified)  # both from the seed
    stalled = [e for e in timeline if e["kind"] == "stalled"]
    assert stalled and all(e["parent_id"].startswith(staller_host + "-") for e in stalled)
    assert "no bytes for" in stalled[0]["detail"]
    assert sorted(e["piece"] for e in timeline if e["kind"] == "stored") == [0, 1]


async def test_a_download_whose_only_holder_stalls_reschedules_then_fails_saying_what_it_waited_for(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    damselfly_origin.make("sole.bin", 8 * MiB)
    staller = {
        "PYTHONPATH": str(ROOT),
        "DAMSELFLY_PLUGINS__LOAD": '["tests.helpers.liar"]',
        "DAMSELFLY_DAEMON__STORAGE": '{"type": "stalling-disk"}',
        "DAMSELFLY_TEST_STALL_SECONDS": "600",
    }
    child = {"DAMSELFLY_DAEMON__STALL_TIMEOUT": "1", "DAMSELFLY_DAEMON__DISABLE_BACK_TO_SOURCE": "true"}
    cluster = damselfly_cluster_factory(peers=2, seed=False, peer_env={1: staller, 2: child})
    url = damselfly_origin.url("sole.bin")
    async with Client(cluster.daemon("peer1")["socket"]) as c:
        await c.download(url, tmp_path / "staller.bin")  # from the origin: the one holder
    async with Client(cluster.daemon("peer2")["socket"]) as c:
        with pytest.raises(DamselflyError) as failed:
            await c.download(url, tmp_path / "out.bin")
        [task] = await c.list_tasks()
        timeline = await c.task_timeline(task.task_id)
    holder = cluster.daemon("peer1")["host_id"]
    why = str(failed.value)  # the scheduler found no other parent: the one way on was the source, refused
    assert "back-to-source is disabled" in why and "waited for pieces 0,1 from " + holder in why
    kinds = [e["kind"] for e in timeline]
    assert kinds.count("requested") == 2 and kinds.count("stalled") == 2 and "stored" not in kinds
    [stall] = [e for e in timeline if e["kind"] == "stall"]
    assert stall["detail"].startswith("no piece data moved for ") and holder in stall["detail"]
