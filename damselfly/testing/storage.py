"""The storage conformance kit: the cases every storage plugin passes.

A storage package subclasses ``StorageConformance`` in its tests and provides a
``make_storage`` fixture returning a function ``data_dir -> Storage`` (not yet
opened); the kit opens, closes and reopens storages itself:

    from damselfly.testing.storage import StorageConformance

    class TestMyStorage(StorageConformance):
        persistent = True            # tasks survive close + reopen on the same data_dir

        @pytest.fixture
        def make_storage(self):
            return lambda data_dir: MyStorage(data_dir, MyStorage.Config())

Cases: write, verify and read back (pieces, ranges clipped to the content, export; a
piece's strong digest, handed to ``commit``, kept with its record); a task created again
with another layout (the origin changed) starts empty; a missing task or piece, and an
unfinished task's export, are NotFound; a piece with a wrong
digest, a short or a long piece is refused and nothing of it is kept; an
interrupted write (aborted mid-piece) leaves the piece absent and can be redone;
a second write of a stored piece, or of one another writer is filling, never reaches
the live bytes (a bad copy changes nothing; a good one is dropped, or landed when the
slower writer, superseded); a crash after the metadata listed pieces whose bytes were then
lost (zeroed, the file cut short; where ``piece_region`` names the file) serves none
of them after a restart;
readers of finished pieces run concurrently with writers of others; ``finish``
refuses an incomplete task; ``delete``; restart (persistent storages keep what
was committed, and only that; others start empty); a full disk (an 8 MiB tmpfs,
when the process may mount one): a clear ``StorageError``, nothing corrupted, and
the storage still usable. ``disk_backed = False`` skips the full-disk cases for
storages that keep nothing in ``data_dir``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from damselfly.contracts import Storage, strong_of
from damselfly.core.errors import NotFound, PieceCorrupt, StorageError
from damselfly.core.piece import Layout, digest, strong_digest
from damselfly.core.task import Task, TaskState

MiB = 1 << 20
CONTENT = bytes(range(256)) * (10 * MiB // 256) + b"tail"


def new_task(task_id: str = "ab" * 32, content: bytes = CONTENT) -> Task:
    layout = Layout.for_content(len(content))
    return Task(id=task_id, url="http://o/x", content_length=len(content), piece_length=layout.piece_length)


async def write_piece(storage: Storage, task: Task, number: int, content: bytes = CONTENT) -> None:
    span = task.layout.span(number)
    data = content[span.offset : span.end]
    w = storage.writer(task.id, span)
    await asyncio.to_thread(w.write, data[: len(data) // 2])
    await asyncio.to_thread(w.write, data[len(data) // 2 :])
    await w.commit(digest(data), strong=strong_digest(data))


async def fill(storage: Storage, task: Task, content: bytes = CONTENT) -> None:
    for n in range(task.piece_count):
        await write_piece(storage, task, n, content)
    await storage.finish(task.id)


def _fill_disk(path: Path, most: int) -> None:
    """Write up to ``most`` bytes, stopping quietly when the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(most // MiB):
            try:
                os.write(fd, b"\1" * MiB)
            except OSError:
                return
    finally:
        os.close(fd)


class StorageConformance:
    persistent: bool = True
    disk_backed: bool = True

    @pytest.fixture
    def make_storage(self) -> Callable[[Path], Storage]:
        raise NotImplementedError("provide `make_storage`: a function data_dir -> Storage")

    @pytest.fixture
    async def storage(self, make_storage: Callable[[Path], Storage], tmp_path: Path) -> AsyncIterator[Storage]:
        s = make_storage(tmp_path / "data")
        await s.open()
        yield s
        await s.close()

    @pytest.fixture
    def tiny_disk(self, tmp_path: Path) -> Iterator[Path]:
        """An 8 MiB tmpfs, for running out of space for real (needs root, as CI has)."""
        if not self.disk_backed:
            pytest.skip("this storage keeps nothing on disk")
        mnt = tmp_path / "tiny"
        mnt.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]
        if subprocess.run(mount, capture_output=True, check=False).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)

    async def test_write_verify_read_and_export(self, storage: Storage, tmp_path: Path) -> None:
        task = await storage.create(new_task())
        assert task.piece_count == 3
        await fill(storage, task)
        assert storage.get(task.id).state is TaskState.SUCCEEDED  # type: ignore[union-attr]
        assert await storage.read_piece(task.id, 2) == CONTENT[8 * MiB :]
        record = storage.get(task.id).pieces[2]  # type: ignore[union-attr]
        assert (record.digest, strong_of(record)) == (digest(CONTENT[8 * MiB :]), strong_digest(CONTENT[8 * MiB :]))
        got = b"".join([c async for c in storage.read_range(task.id, 3, 5 * MiB)])
        assert got == CONTENT[3 : 3 + 5 * MiB]
        out = tmp_path / "out.bin"
        await storage.export(task.id, out)
        assert out.read_bytes() == CONTENT
        assert [t.id for t in storage.tasks()] == [task.id]

    async def test_create_is_idempotent(self, storage: Storage) -> None:
        a = await storage.create(new_task())
        await write_piece(storage, a, 0)
        b = await storage.create(new_task())
        assert b.id == a.id
        assert 0 in b.pieces

    async def test_a_changed_layout_starts_the_task_again(self, storage: Storage) -> None:
        """The origin changed under a stored task: creating it with the new length drops the old pieces."""
        old = await storage.create(new_task())
        await write_piece(storage, old, 0)
        shorter = CONTENT[: 6 * MiB]
        task = await storage.create(new_task(content=shorter))
        assert (task.content_length, task.pieces) == (len(shorter), {})
        await fill(storage, task, shorter)
        assert b"".join([c async for c in storage.read_range(task.id, 0, 7 * MiB)]) == shorter

    async def test_a_range_is_clipped_to_the_content(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        await fill(storage, task)
        got = b"".join([c async for c in storage.read_range(task.id, len(CONTENT) - 10, 100)])
        assert got == CONTENT[-10:]
        assert [c async for c in storage.read_range(task.id, len(CONTENT), 100)] == []

    async def test_what_is_not_stored_is_not_found(self, storage: Storage, tmp_path: Path) -> None:
        missing = "ef" * 32
        with pytest.raises(NotFound):
            storage.writer(missing, new_task(missing).layout.span(0))
        with pytest.raises(NotFound):
            await storage.read_piece(missing, 0)
        with pytest.raises(NotFound):
            _ = [c async for c in storage.read_range(missing, 0, 10)]
        task = await storage.create(new_task())
        await write_piece(storage, task, 0)
        with pytest.raises(NotFound):
            await storage.read_piece(task.id, 1)
        with pytest.raises(NotFound):  # not finished
            await storage.export(task.id, tmp_path / "out.bin")
        assert not (tmp_path / "out.bin").exists()

    async def test_a_wrong_digest_keeps_nothing(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        span = task.layout.span(0)
        w = storage.writer(task.id, span)
        w.write(CONTENT[: span.length])
        with pytest.raises(PieceCorrupt):
            await w.commit("crc32:1")
        assert 0 not in storage.get(task.id).pieces  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await storage.read_piece(task.id, 0)

    async def test_short_and_long_pieces_are_refused(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        span = task.layout.span(1)
        short = storage.writer(task.id, span)
        short.write(CONTENT[span.offset : span.end - 1])
        with pytest.raises((PieceCorrupt, StorageError)):
            await short.commit(None)
        long = storage.writer(task.id, span)

        async def too_long() -> None:  # refused at the write or at the commit
            long.write(CONTENT[span.offset : span.end + 1])
            await long.commit(None)

        with pytest.raises((PieceCorrupt, StorageError)):
            await too_long()
        long.abort()
        assert 1 not in storage.get(task.id).pieces  # type: ignore[union-attr]

    async def test_an_interrupted_write_leaves_no_piece_and_can_be_redone(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        span = task.layout.span(1)
        w = storage.writer(task.id, span)
        w.write(CONTENT[span.offset : span.offset + MiB])
        w.abort()
        assert 1 not in storage.get(task.id).pieces  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await storage.read_piece(task.id, 1)
        await write_piece(storage, task, 1)
        assert await storage.read_piece(task.id, 1) == CONTENT[span.offset : span.end]

    async def test_readers_run_beside_writers(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        await write_piece(storage, task, 0)
        span0 = task.layout.span(0)

        async def reader() -> bool:
            for _ in range(5):
                if await storage.read_piece(task.id, 0) != CONTENT[: span0.length]:
                    return False
                chunk = b"".join([c async for c in storage.read_range(task.id, 100, 1000)])
                if chunk != CONTENT[100:1100]:
                    return False
            return True

        results = await asyncio.gather(*(reader() for _ in range(8)), write_piece(storage, task, 1))
        assert all(results[:8])
        assert await storage.read_piece(task.id, 1) == CONTENT[4 * MiB : 8 * MiB]

    async def test_finish_refuses_an_incomplete_task(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        await write_piece(storage, task, 0)
        with pytest.raises((StorageError, PieceCorrupt, NotFound)):
            await storage.finish(task.id)
        assert storage.get(task.id).state is not TaskState.SUCCEEDED  # type: ignore[union-attr]

    async def test_delete(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        await fill(storage, task)
        await storage.delete(task.id)
        assert storage.get(task.id) is None
        with pytest.raises(NotFound):
            await storage.read_piece(task.id, 0)
        await storage.delete(task.id)  # twice is fine

    async def test_restart(self, make_storage: Callable[[Path], Storage], tmp_path: Path) -> None:
        data_dir = tmp_path / "restart"
        s = make_storage(data_dir)
        await s.open()
        done = await s.create(new_task("aa" * 32))
        await fill(s, done)
        partial = await s.create(new_task("bb" * 32))
        await write_piece(s, partial, 0)
        w = s.writer(partial.id, partial.layout.span(1))  # in flight when the process goes
        w.write(CONTENT[4 * MiB : 5 * MiB])
        await s.close()
        s2 = make_storage(data_dir)
        await s2.open()
        try:
            if not self.persistent:
                assert s2.tasks() == []
                return
            again = s2.get(done.id)
            assert again is not None
            assert again.state is TaskState.SUCCEEDED
            assert await s2.read_piece(done.id, 2) == CONTENT[8 * MiB :]
            p = s2.get(partial.id)
            assert p is not None
            assert set(p.pieces) == {0}
            await write_piece(s2, p, 1)
            await write_piece(s2, p, 2)
            await s2.finish(p.id)
            out = tmp_path / "p.out"
            await s2.export(p.id, out)
            assert out.read_bytes() == CONTENT
        finally:
            await s2.close()

    async def test_a_full_disk_is_a_clear_error(self, make_storage: Callable[[Path], Storage], tiny_disk: Path) -> None:
        """6 MiB + 6 MiB of tasks and 6 MiB of someone else's file on an 8 MiB disk: something must give."""
        s = make_storage(tiny_disk / "data")
        await s.open()
        six = bytes(range(256)) * (6 * MiB // 256)
        errors: list[StorageError] = []
        try:
            first = await s.create(new_task("ef" * 32, six))
            _fill_disk(tiny_disk / "filler", 6 * MiB)  # someone else fills the disk
            for task_id in ("ef" * 32, "cd" * 32):
                try:
                    task = await s.create(new_task(task_id, six))
                    await fill(s, task, six)
                except StorageError as exc:
                    errors.append(exc)
            assert errors, "nothing failed although the data cannot fit"
            assert all("\n" not in str(e) for e in errors)
            for task in s.tasks():  # never a torn piece: what is recorded reads back whole
                for number in task.pieces:
                    span = task.layout.span(number)
                    assert await s.read_piece(task.id, number) == six[span.offset : span.end]
            (tiny_disk / "filler").unlink()
            for task in s.tasks():
                await s.delete(task.id)
            again = await s.create(new_task("12" * 32, six))
            await fill(s, again, six)  # usable again once there is room
            assert await s.read_piece(again.id, 1) == six[4 * MiB :]
            assert first.id != again.id
        finally:
            await s.close()

    async def test_a_second_write_of_a_stored_piece_never_touches_its_live_bytes(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        await write_piece(storage, task, 0)
        span = task.layout.span(0)
        good = CONTENT[: span.length]
        bad = storage.writer(task.id, span)
        bad.write(b"\0" * span.length)  # a lying parent's copy, fetched a second time
        assert await storage.read_piece(task.id, 0) == good  # served meanwhile: the live bytes
        with pytest.raises(PieceCorrupt):
            await bad.commit(digest(good))
        bad.abort()
        again = storage.writer(task.id, span)
        again.write(good)
        record = await again.commit(digest(good))
        assert record.digest == digest(good)
        assert await storage.read_piece(task.id, 0) == good
        assert set(storage.get(task.id).pieces) == {0}  # type: ignore[union-attr]

    async def test_two_writers_of_one_piece_never_mix_their_bytes(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        span = task.layout.span(1)
        good = CONTENT[span.offset : span.end]
        first = storage.writer(task.id, span)
        first.write(good[:MiB])
        second = storage.writer(task.id, span)  # while the first fills the piece
        second.write(b"\0" * span.length)
        first.write(good[MiB:])
        await first.commit(digest(good))
        with pytest.raises(PieceCorrupt):
            await second.commit(digest(good))
        second.abort()
        assert await storage.read_piece(task.id, 1) == good
        # a copy verified first takes the place of a slower writer, whose bytes then go nowhere
        tail = CONTENT[8 * MiB :]
        slower = storage.writer(task.id, task.layout.span(2))
        slower.write(b"\1" * MiB)
        faster = storage.writer(task.id, task.layout.span(2))
        faster.write(tail)
        assert (await faster.commit(digest(tail))).digest == digest(tail)
        slower.write(b"\1" * (len(tail) - MiB))
        assert (await slower.commit(None)).digest == digest(tail)  # the record of the copy that landed
        assert await storage.read_piece(task.id, 2) == tail

    async def test_a_writer_dropped_without_abort_does_not_hold_its_piece(self, storage: Storage) -> None:
        task = await storage.create(new_task())
        storage.writer(task.id, task.layout.span(0)).write(b"\1" * MiB)  # its caller went away
        await write_piece(storage, task, 0)
        assert await storage.read_piece(task.id, 0) == CONTENT[: 4 * MiB]

    async def test_a_crash_that_lost_listed_bytes_serves_none_of_them(
        self, make_storage: Callable[[Path], Storage], tmp_path: Path
    ) -> None:
        """The process dies (no ``close``) after the metadata listed pieces whose bytes never
        reached the disk: after a restart those pieces are absent and the rest read back whole."""
        if not self.persistent:
            pytest.skip("nothing survives a restart")
        data_dir = tmp_path / "crash"
        s = make_storage(data_dir)
        await s.open()
        try:
            task = await s.create(new_task())
            for n in range(3):
                await write_piece(s, task, n)
            zeroed, cut = s.piece_region(task.id, 1), s.piece_region(task.id, 2)
            if zeroed is None or cut is None:
                pytest.skip("this storage keeps no piece in a file the kit can damage")
            with open(zeroed.path, "r+b") as f:  # the crash: piece 1 never written, piece 2 half
                f.seek(zeroed.offset)
                f.write(b"\0" * zeroed.length)
            os.truncate(cut.path, cut.offset + cut.length // 2)
            again = make_storage(data_dir)
            await again.open()
            try:
                p = again.get(task.id)
                assert p is not None
                assert set(p.pieces) == {0}
                assert await again.read_piece(task.id, 0) == CONTENT[: 4 * MiB]
                with pytest.raises(NotFound):
                    await again.read_piece(task.id, 1)
                await write_piece(again, p, 1)
                await write_piece(again, p, 2)
                await again.finish(task.id)
                assert b"".join([c async for c in again.read_range(task.id, 0, len(CONTENT))]) == CONTENT
            finally:
                await again.close()
        finally:
            await s.close()
