"""Pure parts of a download: how a seed cuts the source into long reads, how many fetches run."""

import pytest

from damselfly.config import DaemonConfig
from damselfly.daemon.download import _Fetch, endgame, fetch_slots, source_runs


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


@pytest.mark.parametrize(
    ("in_flight", "from_seeds", "settings", "sharing", "full"),
    [
        (5, 0, {}, False, (False, False)),
        (6, 0, {}, False, (True, False)),  # ordinary slots full: only a seed may be asked now
        (7, 1, {}, False, (True, True)),  # and its one extra slot taken
        (6, 1, {}, False, (False, False)),  # the seed's fetch is in the extra slot
        (7, 7, {}, False, (True, True)),  # fetches from seeds beyond the extra one take ordinary slots
        (6, 6, {"seed_extra_pieces": 0}, False, (True, True)),
        (4, 0, {"share_concurrent_pieces": 4}, True, (True, False)),  # a share being read holds two back
        (4, 0, {"share_concurrent_pieces": 4}, False, (False, False)),  # and gives them back when it is in
        (5, 1, {"share_concurrent_pieces": 4}, True, (True, True)),
        (5, 0, {"share_concurrent_pieces": 8}, True, (False, False)),  # never more than concurrent_pieces
        (6, 0, {"share_concurrent_pieces": 8}, True, (True, False)),
    ],
)
def test_fetch_slots_count_the_extra_seed_slot_and_hold_some_back_while_a_share_is_read(
    in_flight, from_seeds, settings, sharing, full
):
    cfg = DaemonConfig(**{"concurrent_pieces": 6, "seed_extra_pieces": 1, **settings})
    assert fetch_slots(in_flight, from_seeds, cfg, sharing=sharing) == full


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


@pytest.mark.parametrize(
    ("missing", "in_flight", "expected"),
    [
        ({3, 4}, [3, 4], True),  # every missing piece is being fetched: the endgame
        ({3, 4}, [3, 4, 4], True),
        ({4}, [3, 4], True),  # piece 3 is in but its fetch not yet reaped
        ({3, 4, 5}, [3, 4], False),  # piece 5 is held by no parent yet: mid-download, no duplicates
        ({3, 4}, [], False),
    ],
)
def test_the_endgame_begins_only_once_every_missing_piece_is_in_flight(missing, in_flight, expected):
    fetches = [_Fetch(n, f"parent{i}", False, 0.0) for i, n in enumerate(in_flight)]
    assert endgame(missing, fetches) is expected
