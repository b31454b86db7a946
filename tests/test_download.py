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
