import pytest

from damselfly.core.errors import InvalidArgument
from damselfly.core.units import parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("128MiB", 128 << 20), ("4M", 4_000_000), ("1.5GiB", 3 << 29), ("1048576", 1 << 20), ("2 kb", 2000)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_rate():
    assert parse_rate("50MB/s") == 50_000_000
    assert parse_rate("400Mbit/s") == 50_000_000


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-3MiB", "MiB"])
def test_bad_sizes_are_one_line_errors(bad):
    with pytest.raises(InvalidArgument, match="not a size"):
        parse_size(bad)
