"""Properties of the proxy's request parsing: valid ranges round-trip, every answer lies within
the representation, and no Range or ``X-Dragonfly-*`` header value raises anything but
``InvalidArgument``; what the headers give, the download request's protobuf holds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from damselfly.core.errors import InvalidArgument
from damselfly.core.piece import MAX_PIECE_LENGTH
from damselfly.daemon.proxyswarm import MAX_PRIORITY, SwarmResponder, header_number, parse_range

pytestmark = pytest.mark.timeout(60)

sizes = st.integers(0, 2**40)


@settings(max_examples=200, deadline=None)
@given(sizes.filter(bool), st.data())
def test_a_range_within_the_representation_round_trips(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start, size - 1))
    assert parse_range(f"bytes={start}-{end}", size) == (start, end - start + 1)
    assert parse_range(f"bytes={start}-", size) == (start, size - start)
    assert parse_range(f" bytes = {start} - {end} ", size) == (start, end - start + 1)


@settings(max_examples=200, deadline=None)
@given(sizes, st.integers(1, 2**41))
def test_a_suffix_range_is_the_last_bytes_or_unsatisfiable_when_empty(size: int, n: int) -> None:
    wanted = parse_range(f"bytes=-{n}", size)
    assert wanted == ((max(size - n, 0), min(n, size)) if size else None)


@settings(max_examples=250, deadline=None)
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\s*bytes\s*=\s*\d{0,30}\s*-\s*\d{0,30}\s*")), sizes)
def test_any_string_is_a_range_within_the_size_none_or_invalid_argument(value: str, size: int) -> None:
    try:
        wanted = parse_range(value, size)
    except InvalidArgument:
        return
    if wanted is not None:
        start, length = wanted
        assert 0 <= start < size
        assert 1 <= length <= size - start


def test_a_position_of_thousands_of_digits_is_past_any_size_not_a_crash() -> None:
    """``int`` refuses more than 4,300 digits, with a ValueError the proxy answered as a 502."""
    huge = "9" * 5000
    assert parse_range(f"bytes={huge}-", 100) is None
    assert parse_range(f"bytes=0-{huge}", 100) == (0, 100)
    assert parse_range(f"bytes=-{huge}", 100) == (0, 100)
    assert parse_range(f"bytes=-{'0' * 5000}7", 100) == (93, 7)


def test_digits_other_than_ascii_are_no_range() -> None:
    """RFC 9110's DIGIT is ASCII: ``\\d`` used to take "٣" (Arabic-Indic three) as 3."""
    with pytest.raises(InvalidArgument):
        parse_range("bytes=\u0663-", 10)


def test_a_suffix_of_an_empty_representation_is_unsatisfiable() -> None:
    """It used to be (0, 0), which no Content-Range can express."""
    assert parse_range("bytes=-5", 0) is None


class Request:
    """What ``download_request`` reads of an aiohttp request: its headers."""

    def __init__(self, headers: dict[str, str]):
        self.headers = CIMultiDict(headers)


numbers = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1_000", "\u0663", " 7 ", "+5", "0x10", "1e3", "9" * 5000]),
)


@settings(max_examples=200, deadline=None)
@given(numbers, numbers)
def test_any_piece_length_and_priority_headers_make_a_request_or_invalid_argument(length: str, priority: str) -> None:
    responder = SwarmResponder(None, None, None, None)  # type: ignore[arg-type]  # download_request needs none
    headers = {"X-Dragonfly-Piece-Length": length, "X-Dragonfly-Priority": priority, "Range": "bytes=0-1"}
    try:
        req = responder.download_request(Request(headers), "http://origin/x.bin", None)  # type: ignore[arg-type]
    except InvalidArgument:
        return
    assert 0 <= req.piece_length <= MAX_PIECE_LENGTH and 0 <= req.priority <= MAX_PRIORITY
    assert req.to_proto().piece_length == req.piece_length  # the protobuf holds what was taken
    assert "Range" not in req.request_header


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**40))
def test_a_number_header_within_its_bound_reads_as_itself(value: int) -> None:
    assert header_number(CIMultiDict({"N": f" {value} "}), "N", 2**40) == value
    assert header_number(CIMultiDict(), "N", 0) == 0


def test_a_negative_piece_length_is_a_bad_request_not_a_protobuf_error() -> None:
    """``int`` took "-1", and ``to_proto`` then raised ValueError (a 502)."""
    with pytest.raises(InvalidArgument, match="X-Dragonfly-Piece-Length"):
        header_number(CIMultiDict({"X-Dragonfly-Piece-Length": "-1"}), "X-Dragonfly-Piece-Length", MAX_PIECE_LENGTH)
    with pytest.raises(InvalidArgument, match="X-Dragonfly-Priority"):
        header_number(CIMultiDict({"X-Dragonfly-Priority": str(2**40)}), "X-Dragonfly-Priority", MAX_PRIORITY)
