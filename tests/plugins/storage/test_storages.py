"""What the conformance kit does not cover: each built-in storage's own behaviour."""

import asyncio
import json
import os
from pathlib import Path

import pytest

from damselfly.core.errors import StorageError
from damselfly.core.task import Task, TaskState
from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryConfig, MemoryStorage
from damselfly.testing.storage import CONTENT, MiB, fill, new_task


async def test_disk_drops_a_task_whose_metadata_is_corrupt(tmp_path):
    s = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await s.open()
    task = await s.create(new_task())
    await s.close()
    (tmp_path / "tasks" / task.id / "meta.json").write_text("{not json")
    again = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await again.open()
    assert again.get(task.id) is None
    assert not (tmp_path / "tasks" / task.id).exists()


async def test_disk_refuses_a_task_that_would_fill_the_disk(tmp_path):
    s = DiskStorage(tmp_path, DiskConfig(min_free_bytes=1 << 60))
    await s.open()
    with pytest.raises(StorageError, match="not enough disk space"):
        await s.create(new_task())
    assert s.get(new_task().id) is None


async def test_memory_storage_evicts_finished_tasks_only(tmp_path):
    s = MemoryStorage(tmp_path, MemoryConfig(capacity=25 * MiB))
    a = await s.create(new_task("aa" * 32))
    await fill(s, a)
    b = await s.create(new_task("bb" * 32))
    c = await s.create(new_task("cc" * 32))  # needs room: the finished task goes
    assert s.get(a.id) is None and s.get(b.id) is not None and s.get(c.id) is not None
    with pytest.raises(StorageError, match="still downloading"):
        await s.create(new_task("dd" * 32))


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs, for running out of space for real (needs root, as CI has)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_with_preallocation_refuses_up_front(tiny_disk):
    s = DiskStorage(tiny_disk, DiskConfig())
    await s.open()
    with pytest.raises(StorageError, match="not enough disk space"):
        await s.create(new_task())  # 10 MiB on an 8 MiB disk
    assert s.get(new_task().id) is None
    assert list((tiny_disk / "tasks").iterdir()) == []
    await s.close()


async def test_running_out_of_space_mid_piece_keeps_nothing(tiny_disk):
    s = DiskStorage(tiny_disk, DiskConfig(preallocate=False, persist_interval=0))
    await s.open()
    task = await s.create(Task(id="ef" * 32, url="http://o/x", content_length=6 * MiB, piece_length=4 * MiB))
    (tiny_disk / "filler").write_bytes(b"\0" * (6 * MiB))  # someone else fills the disk
    span = task.layout.span(0)
    w = s.writer(task.id, span)

    def write() -> None:
        for i in range(0, span.length, MiB):
            w.write(CONTENT[i : i + MiB])

    with pytest.raises(StorageError, match="No space left on device"):
        write()
    w.abort()
    assert 0 not in s.get(task.id).pieces
    await s.close()


@pytest.fixture
def slow_rename(monkeypatch):
    """``os.replace`` in the disk storage waits for ``release`` (a rename behind a busy journal),
    then fails if ``fail`` is set."""
    import errno
    import threading
    from types import SimpleNamespace

    from damselfly.plugins.storage import disk

    gate = SimpleNamespace(entered=threading.Event(), release=threading.Event(), fail=threading.Event())
    real = disk.os.replace

    def replace(src, dst):  # type: ignore[no-untyped-def]
        gate.entered.set()
        if not gate.release.wait(30):
            raise AssertionError("the test never released the rename")
        if gate.fail.is_set():
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(disk.os, "replace", replace)
    yield gate
    gate.release.set()


async def test_a_slow_metadata_save_holds_up_neither_the_event_loop_nor_finish(tmp_path, slow_rename):
    import asyncio
    import json

    from damselfly.testing.storage import write_piece

    gate = slow_rename
    gate.release.set()  # creation saves on the caller's thread: let it through
    s = DiskStorage(tmp_path)
    await s.open()
    task = await s.create(new_task())
    for n in range(task.piece_count):
        await write_piece(s, task, n)
    gate.entered.clear()
    gate.release.clear()
    await asyncio.wait_for(s.finish(task.id), 10)  # returns with the save still to come...
    assert s.get(task.id).state.value == "Succeeded"
    assert await asyncio.to_thread(gate.entered.wait, 10)  # ...which now sits in its rename
    meta = tmp_path / "tasks" / task.id / "meta.json"
    assert json.loads(meta.read_text())["state"] == "Running"
    gate.fail.set()  # and fails
    gate.release.set()
    await asyncio.wait_for(asyncio.gather(*s._saves), 10)  # the background save, failed
    assert json.loads(meta.read_text())["state"] == "Running"
    gate.fail.clear()
    await asyncio.wait_for(s.close(), 10)  # close writes what has not landed
    saved = json.loads(meta.read_text())
    assert saved["state"] == "Succeeded" and len(saved["pieces"]) == task.piece_count


async def test_a_late_metadata_save_never_overwrites_a_newer_one_or_a_delete(tmp_path):
    import json

    from loguru import logger

    from damselfly.testing.storage import write_piece

    s = DiskStorage(tmp_path)
    await s.open()
    task = await s.create(new_task())
    await write_piece(s, task, 0)
    overtaken = s._snapshot(task.id)  # a periodic save whose thread is slow to run
    await write_piece(s, task, 1)
    await s._save(task.id)  # a later save lands first
    assert overtaken is not None
    s._write_meta(task.id, *overtaken)  # ...and the slow one arrives
    meta = json.loads((tmp_path / "tasks" / task.id / "meta.json").read_text())
    assert [p["number"] for p in meta["pieces"]] == [0, 1]

    queued = s._snapshot(task.id)
    await s.delete(task.id)
    errors: list[str] = []
    logger.enable("damselfly")
    sink = logger.add(errors.append, level="ERROR")
    try:
        assert queued is not None
        s._write_meta(task.id, *queued)  # a save still queued when the task went
    finally:
        logger.remove(sink)
        logger.disable("damselfly")
    assert errors == [] and not (tmp_path / "tasks" / task.id).exists()
    await s.close()


async def test_disk_syncs_the_content_before_the_metadata_that_lists_it(tmp_path, monkeypatch):
    from damselfly.plugins.storage import disk
    from damselfly.testing.storage import write_piece

    s = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await s.open()
    task = await s.create(new_task())
    content, meta = tmp_path / "tasks" / task.id / "content", tmp_path / "tasks" / task.id / "meta.json"
    events: list[str] = []
    real_fdatasync, real_replace = disk.os.fdatasync, disk.os.replace

    def fdatasync(fd):  # type: ignore[no-untyped-def]
        events.append("data" if os.path.samefile(f"/proc/self/fd/{fd}", content) else "other")
        real_fdatasync(fd)

    def replace(src, dst):  # type: ignore[no-untyped-def]
        events.append("meta" if Path(dst) == meta else "other")
        real_replace(src, dst)

    monkeypatch.setattr(disk.os, "fdatasync", fdatasync)
    monkeypatch.setattr(disk.os, "replace", replace)
    await write_piece(s, task, 0)
    assert events == ["data", "meta"]
    assert json.loads(meta.read_text())["synced"] is True
    await s.close()


async def test_disk_without_sync_saves_unsynced_metadata_and_a_clean_close_syncs_it(tmp_path, monkeypatch):
    from damselfly.plugins.storage import disk
    from damselfly.testing.storage import write_piece

    synced: list[int] = []
    real = disk.os.fdatasync
    monkeypatch.setattr(disk.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    s = DiskStorage(tmp_path, DiskConfig(persist_interval=0, sync=False))
    await s.open()
    task = await s.create(new_task())
    await write_piece(s, task, 0)
    meta = tmp_path / "tasks" / task.id / "meta.json"
    assert synced == []
    assert json.loads(meta.read_text())["synced"] is False
    await s.close()
    assert len(synced) == 1
    assert json.loads(meta.read_text())["synced"] is True


async def test_disk_reverifies_a_finished_task_saved_without_sync_after_a_crash(tmp_path):
    s = DiskStorage(tmp_path, DiskConfig(persist_interval=0, sync=False))
    await s.open()
    task = await s.create(new_task())
    await fill(s, task)
    await asyncio.gather(*s._saves)
    content = tmp_path / "tasks" / task.id / "content"
    with open(content, "r+b") as f:  # the crash: piece 1's bytes were still in the page cache
        f.seek(4 * MiB)
        f.write(b"\0" * MiB)
    again = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await again.open()
    try:
        reopened = again.get(task.id)
        assert reopened is not None
        assert set(reopened.pieces) == {0, 2}
        assert reopened.state is TaskState.RUNNING
        saved = json.loads((tmp_path / "tasks" / task.id / "meta.json").read_text())
        assert (saved["synced"], saved["state"], len(saved["pieces"])) == (True, "Running", 2)
    finally:
        await again.close()
        await s.close()


async def test_disk_trusts_synced_metadata_after_a_clean_close(tmp_path, monkeypatch):
    from damselfly.plugins.storage import disk

    s = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await s.open()
    await fill(s, await s.create(new_task()))
    await s.close()
    reverified: list[str] = []
    monkeypatch.setattr(disk, "_reverify", lambda content, task: reverified.append(task.id) or [])
    again = DiskStorage(tmp_path, DiskConfig(persist_interval=0))
    await again.open()
    assert reverified == []
    assert again.get(new_task().id).state is TaskState.SUCCEEDED
    await again.close()


async def test_disk_removes_a_task_directory_a_crash_left_without_metadata(tmp_path):
    stray = tmp_path / "tasks" / ("cd" * 32)
    stray.mkdir(parents=True)
    (stray / "content").write_bytes(b"half made")
    s = DiskStorage(tmp_path)
    await s.open()
    assert not stray.exists()
    assert s.tasks() == []
    await s.close()
