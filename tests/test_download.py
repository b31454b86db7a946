"""Pure parts of a download: how a seed cuts the source into long reads."""

import pytest

from damselfly.daemon.download import source_runs


@pytest.mark.parametrize(
    ("numbers", "width", "runs"),
    [
        (list(range(8)), 1, [list(range(8))]),  # one read of the whole task
        (list(range(8)), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (list(range(5)), 4, [[0], [1], [2], [3, 4]]),
        (list(range(3)), 8, [[0], [1], [2]]),  # never more runs than pieces
        ([0, 1, 5, 6, 7, 9], 1, [[0, 1], [5, 6, 7], [9]]),  # gaps always split (what is stored is not read)
        ([], 4, []),
    ],
)
def test_missing_pieces_become_at_most_width_runs_of_consecutive_pieces(numbers, width, runs):
    assert source_runs(numbers, width) == runs


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
