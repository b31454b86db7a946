"""Garbage collection: task TTL, quota watermarks (least recently used first), tasks in use spared."""

import asyncio
import json
import sys
import time

import pytest

from damselfly.config import load_settings
from damselfly.daemon import gc as gc_module
from damselfly.daemon.daemon import Daemon
from damselfly.sdk.client import Client

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
async def daemon(tmp_path):
    settings = load_settings(
        daemon={
            "data_dir": str(tmp_path / "d"),
            "gc": {"quota": "20MiB", "high_watermark": 80, "low_watermark": 50, "task_ttl": 3600, "interval": 3600},
        }
    )
    d = Daemon(settings)
    await d.start()
    yield d
    await d.stop()


async def fetch(d: Daemon, tmp_path, name: str, size: int) -> str:
    src = tmp_path / f"{name}.src"
    src.write_bytes(bytes([len(name)]) * size)
    async with Client(d.socket_path) as c:
        r = await c.download(src.as_uri(), tmp_path / f"{name}.out")
    return r.task_id


async def test_over_the_high_watermark_the_least_recently_used_go(daemon, tmp_path):
    ids = [await fetch(daemon, tmp_path, n, 6 * MiB) for n in ("a", "bb", "ccc")]  # 18 MiB > 16 MiB
    daemon.gc.touch(ids[0])  # the oldest was read again: now the second is least recently used
    report = await daemon.gc.collect()
    assert set(report.removed) == {ids[1], ids[2]}  # 18 MiB -> 12 -> 6, under the 10 MiB low watermark
    assert report.used_bytes == 6 * MiB and report.freed_bytes == 12 * MiB
    assert all(daemon.storage.get(t) is None for t in report.removed)
    assert daemon.storage.get(ids[0]) is not None


async def test_a_task_being_served_is_kept(daemon, tmp_path):
    ids = [await fetch(daemon, tmp_path, n, 6 * MiB) for n in ("a", "bb", "ccc")]
    daemon.gc.served(ids[0])  # a child fetched a piece just now
    daemon.gc.last_used[ids[0]] = 0  # ... and it is otherwise the oldest
    report = await daemon.gc.collect()
    assert ids[0] not in report.removed and ids[0] in report.kept_in_use
    assert report.removed


async def test_the_ttl_removes_unused_tasks(daemon, tmp_path, monkeypatch):
    task = await fetch(daemon, tmp_path, "a", MiB)
    fresh = await daemon.gc.collect()
    assert fresh.removed == {}
    later = time.time() + 3601
    monkeypatch.setattr(gc_module.time, "time", lambda: later)
    report = await daemon.gc.collect()
    assert list(report.removed) == [task] and "unused for over 3600s" in report.removed[task]
    assert daemon.storage.get(task) is None


async def test_a_running_download_is_never_collected(daemon, tmp_path, monkeypatch):
    from damselfly.testing import OriginProcess

    origin = OriginProcess(tmp_path / "origin", rate="6MB/s")
    try:
        src = origin.make("slow.bin", 12 * MiB)
        first_piece = asyncio.Event()
        seen: list[str] = []

        def progress(p):
            if p.pieces:
                seen.append(p.task_id)
                first_piece.set()

        async with Client(daemon.socket_path) as c:
            job = asyncio.create_task(c.download(origin.url("slow.bin"), tmp_path / "s.out", on_progress=progress))
            await asyncio.wait_for(first_piece.wait(), 30)
            later = time.time() + 10**6  # every task is past its TTL
            monkeypatch.setattr(gc_module.time, "time", lambda: later)
            report = await daemon.gc.collect()
            await job
        assert seen[0] in report.kept_in_use and seen[0] not in report.removed
        assert (tmp_path / "s.out").read_bytes() == src.read_bytes()
    finally:
        origin.stop()


async def test_gc_from_the_command_line(daemon, tmp_path):
    await fetch(daemon, tmp_path, "a", 7 * MiB)
    await fetch(daemon, tmp_path, "bb", 7 * MiB)
    await fetch(daemon, tmp_path, "ccc", 7 * MiB)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "damselfly",
        "gc",
        "--json",
        "--socket",
        str(daemon.socket_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert len(report["removed"]) == 2 and report["used_bytes"] == 7 * MiB
    assert len(daemon.storage.tasks()) == 1
