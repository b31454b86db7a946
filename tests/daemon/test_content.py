"""A task stored before this download, checked whole against the digest a client names."""

import hashlib
import zlib

import pytest

from damselfly.core.errors import InvalidArgument, PieceCorrupt
from damselfly.core.piece import digest
from damselfly.core.task import Task
from damselfly.daemon.content import check_stored
from damselfly.plugins.storage.memory import MemoryStorage

DATA = bytes(range(256)) * 64  # two 8 KiB pieces


async def stored(tmp_path) -> tuple[MemoryStorage, Task]:
    storage = MemoryStorage(tmp_path)
    await storage.open()
    task = await storage.create(Task(id="d" * 64, content_length=len(DATA), piece_length=len(DATA) // 2))
    for span in task.layout.spans():
        writer = storage.writer(task.id, span)
        piece = DATA[span.offset : span.end]
        writer.write(piece)
        await writer.commit(digest(piece))
    return storage, task


@pytest.mark.parametrize(
    "expected",
    ["sha256:" + hashlib.sha256(DATA).hexdigest(), "md5:" + hashlib.md5(DATA).hexdigest(), f"crc32:{zlib.crc32(DATA)}"],
)
async def test_a_stored_task_that_matches_its_digest_is_kept(tmp_path, expected):
    storage, task = await stored(tmp_path)
    await check_stored(storage, task, expected)
    assert storage.get(task.id) is not None


async def test_a_stored_task_that_does_not_match_is_deleted(tmp_path):
    storage, task = await stored(tmp_path)
    with pytest.raises(PieceCorrupt, match="content digest mismatch"):
        await check_stored(storage, task, "sha256:" + "0" * 64)
    assert storage.get(task.id) is None


async def test_an_unknown_digest_algorithm_is_refused_and_the_task_kept(tmp_path):
    storage, task = await stored(tmp_path)
    with pytest.raises(InvalidArgument):
        await check_stored(storage, task, "blake2:" + "0" * 64)
    assert storage.get(task.id) is not None
