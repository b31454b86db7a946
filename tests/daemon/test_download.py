"""An endgame copy of a piece: verified aside, landed only when it wins (the policy: test_planner.py)."""

import pytest


async def test_a_staged_copy_is_verified_aside_and_lands_only_when_asked(tmp_path):
    from damselfly.contracts import StagedPieceWriter
    from damselfly.core.errors import PieceCorrupt
    from damselfly.core.piece import PieceSpan, digest
    from damselfly.core.task import Task
    from damselfly.plugins.storage.disk import DiskStorage

    storage = DiskStorage(tmp_path)
    await storage.open()
    try:
        data = bytes(range(256)) * 16
        task = await storage.create(Task(id="c" * 64, content_length=2 * len(data), piece_length=len(data)))
        span = PieceSpan(1, len(data), len(data))
        staged = StagedPieceWriter(span, tmp_path, in_memory=1024)  # spills to a file past 1 KiB
        staged.write(data[:1000])
        staged.write(data[1000:])
        empty = StagedPieceWriter(span, tmp_path)
        with pytest.raises(PieceCorrupt):
            await empty.commit(digest(data))  # nothing written: refused
        empty.abort()
        record = await staged.commit(digest(data))
        assert record.digest == digest(data) and 1 not in task.pieces  # verified, not stored
        writer = storage.writer(task.id, span)
        staged.land(writer)
        await writer.commit(record.digest)
        staged.abort()
        assert await storage.read_piece(task.id, 1) == data
        loser = StagedPieceWriter(span, tmp_path)
        loser.abort()
        with pytest.raises(PieceCorrupt, match="after abort"):
            loser.write(data)  # a worker thread still writing into a cancelled copy is refused
    finally:
        await storage.close()
