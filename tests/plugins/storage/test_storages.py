"""disk and memory storages: verified writes, atomic pieces, restart, export."""

from pathlib import Path

import pytest

from damselfly.core.errors import NotFound, PieceCorrupt, StorageError
from damselfly.core.piece import Layout, digest
from damselfly.core.task import Task, TaskState
from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryConfig, MemoryStorage

MiB = 1 << 20
CONTENT = bytes(range(256)) * (10 * MiB // 256) + b"tail"


def make(kind: str, root: Path):
    if kind == "disk":
        return DiskStorage(root, DiskConfig(persist_interval=0))
    return MemoryStorage(root, MemoryConfig(capacity=64 * MiB))


def new_task(task_id: str = "ab" * 32) -> Task:
    layout = Layout.for_content(len(CONTENT))
    return Task(id=task_id, url="http://o/x", content_length=len(CONTENT), piece_length=layout.piece_length)


async def fill(storage, task: Task) -> None:
    for span in task.layout.spans():
        w = storage.writer(task.id, span)
        data = CONTENT[span.offset : span.end]
        w.write(data[: len(data) // 2])
        w.write(data[len(data) // 2 :])
        await w.commit(digest(data))
    await storage.finish(task.id)


@pytest.fixture(params=["disk", "memory"])
async def storage(request, tmp_path):
    s = make(request.param, tmp_path)
    await s.open()
    yield s
    await s.close()


async def test_write_verify_read_and_export(storage, tmp_path):
    task = await storage.create(new_task())
    assert task.piece_count == 3
    await fill(storage, task)
    assert storage.get(task.id).state is TaskState.SUCCEEDED
    assert await storage.read_piece(task.id, 2) == CONTENT[8 * MiB :]
    got = b"".join([c async for c in storage.read_range(task.id, 3, 5 * MiB)])
    assert got == CONTENT[3 : 3 + 5 * MiB]
    out = tmp_path / "out.bin"
    await storage.export(task.id, out)
    assert out.read_bytes() == CONTENT


async def test_a_piece_that_fails_its_digest_is_not_kept(storage):
    task = await storage.create(new_task())
    span = task.layout.span(0)
    w = storage.writer(task.id, span)
    w.write(b"\x00" * span.length)
    with pytest.raises(PieceCorrupt):
        await w.commit(digest(CONTENT[: span.length]))
    assert 0 not in storage.get(task.id).pieces
    with pytest.raises(NotFound):
        await storage.read_piece(task.id, 0)


async def test_short_and_long_pieces_are_rejected(storage):
    task = await storage.create(new_task())
    span = task.layout.span(1)
    w = storage.writer(task.id, span)
    w.write(b"x" * 10)
    with pytest.raises(PieceCorrupt, match=r"10 of|short"):
        await w.commit(None)
    w = storage.writer(task.id, span)
    with pytest.raises(PieceCorrupt, match="longer"):
        w.write(b"x" * (span.length + 1))


async def test_finish_refuses_an_incomplete_task(storage):
    task = await storage.create(new_task())
    with pytest.raises(StorageError, match="0 of 3"):
        await storage.finish(task.id)
    with pytest.raises(NotFound):
        await storage.export(task.id, Path("/tmp/never"))


async def test_disk_tasks_survive_a_restart(tmp_path):
    s = make("disk", tmp_path)
    await s.open()
    task = await s.create(new_task())
    await fill(s, task)
    partial = await s.create(new_task("cd" * 32))
    span = partial.layout.span(0)
    w = s.writer(partial.id, span)
    w.write(CONTENT[: span.length])
    await w.commit(None)
    await s.close()

    again = make("disk", tmp_path)
    await again.open()
    t = again.get(task.id)
    assert t is not None and t.state is TaskState.SUCCEEDED and len(t.pieces) == 3
    assert await again.read_piece(task.id, 1) == CONTENT[4 * MiB : 8 * MiB]
    p = again.get(partial.id)
    assert p is not None and set(p.pieces) == {0}
    await again.close()


async def test_disk_drops_a_task_whose_metadata_is_corrupt(tmp_path):
    s = make("disk", tmp_path)
    await s.open()
    task = await s.create(new_task())
    await s.close()
    (tmp_path / "tasks" / task.id / "meta.json").write_text("{not json")
    again = make("disk", tmp_path)
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


async def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tiny_disk):
    s = DiskStorage(tiny_disk, DiskConfig())
    await s.open()
    with pytest.raises(StorageError, match="not enough disk space"):
        await s.create(new_task())  # 10 MiB on an 8 MiB disk
    assert s.get(new_task().id) is None
    assert list((tiny_disk / "tasks").iterdir()) == []
    small = Task(id="cd" * 32, url="http://o/s", content_length=1 << 20, piece_length=4 * MiB)
    await s.create(small)  # the disk is still usable afterwards
    assert s.get(small.id) is not None
    await s.close()


async def test_running_out_of_space_mid_piece_keeps_nothing(tiny_disk):
    s = DiskStorage(tiny_disk, DiskConfig(preallocate=False, persist_interval=0))
    await s.open()
    task = await s.create(Task(id="ef" * 32, url="http://o/x", content_length=6 * MiB, piece_length=4 * MiB))
    (tiny_disk / "filler").write_bytes(b"\0" * (6 * MiB))  # someone else fills the disk
    span = task.layout.span(0)
    w = s.writer(task.id, span)

    def fill() -> None:
        for i in range(0, span.length, MiB):
            w.write(CONTENT[i : i + MiB])

    with pytest.raises(StorageError, match="No space left on device"):
        fill()
    w.abort()
    assert 0 not in s.get(task.id).pieces
    await s.close()
