import zlib

import pytest

from damselfly.core.errors import InvalidArgument, PieceCorrupt
from damselfly.core.piece import Layout, MiB, digest, piece_length_for, verify


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 4 * MiB),
        (1, 4 * MiB),
        (100 * MiB, 4 * MiB),
        (2000 * MiB, 4 * MiB),  # 2000/500 = 4 MiB exactly
        (2001 * MiB, 8 * MiB),
        (10 * 1024 * MiB, 32 * MiB),  # 10 GiB / 500 = 20.5 MiB -> 32 MiB
        (100 * 1024 * MiB, 64 * MiB),  # clamped
    ],
)
def test_piece_length_rule(length, expected):
    assert piece_length_for(length) == expected


def test_fixed_piece_length_is_kept_and_bounded():
    assert piece_length_for(10, 16 * MiB) == 16 * MiB
    assert piece_length_for(10, 1 * MiB) == 1 * MiB  # below upstream's 4 MiB: damselfly's extension
    with pytest.raises(InvalidArgument, match="outside"):
        piece_length_for(10, 32 * 1024)
    with pytest.raises(InvalidArgument):
        piece_length_for(10, 128 * MiB)


def test_layout_spans_cover_the_content_once():
    layout = Layout(10 * MiB + 3, 4 * MiB)
    spans = layout.spans()
    assert layout.piece_count == 3
    assert [s.length for s in spans] == [4 * MiB, 4 * MiB, 2 * MiB + 3]
    assert spans[-1].end == 10 * MiB + 3
    assert Layout(0, 4 * MiB).piece_count == 0
    with pytest.raises(InvalidArgument):
        layout.span(3)


def test_numbers_for_range():
    layout = Layout(10 * MiB, 4 * MiB)
    assert list(layout.numbers_for_range(0, 64)) == [0]
    assert list(layout.numbers_for_range(4 * MiB - 1, 2)) == [0, 1]
    assert list(layout.numbers_for_range(9 * MiB, 100 * MiB)) == [2]
    assert list(layout.numbers_for_range(10 * MiB, 5)) == []


def test_digest_and_verify():
    data = b"damselfly" * 1000
    d = digest(data)
    assert d == f"crc32:{zlib.crc32(data)}"
    verify(data, d)
    with pytest.raises(PieceCorrupt, match="mismatch"):
        verify(data[:-1] + b"x", d)
    with pytest.raises(PieceCorrupt, match="unsupported"):
        verify(data, "md5:abc")


def test_fast_crc32_is_zlibs_crc32():
    from damselfly.core.piece import crc32

    data = bytes(range(256)) * 4099
    assert crc32(data, 0) == zlib.crc32(data)
    assert crc32(data[1000:], crc32(data[:1000], 0)) == zlib.crc32(data)
    assert crc32(memoryview(data)[5:77], 0) == zlib.crc32(data[5:77])


def test_strong_digests_are_sha256_and_blake3_in_one_pass():
    import hashlib

    import blake3

    from damselfly.core.piece import algorithm_of, new_hasher, strong_digest

    data = b"damselfly" * 1000
    assert strong_digest(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert strong_digest(data, "blake3") == "blake3:" + blake3.blake3(data).hexdigest()
    assert strong_digest(data, "crc32") == digest(data)  # upstream's weak mode speaks Dragonfly's format
    h = new_hasher("blake3")
    h.update(data[:5])
    twin = h.copy()  # a running hash carried on by the next piece's writer
    h.update(data[5:])
    twin.update(data[5:])
    assert h.hexdigest() == twin.hexdigest() == blake3.blake3(data).hexdigest()
    assert algorithm_of(strong_digest(data)) == "sha256"
    with pytest.raises(InvalidArgument, match="unsupported piece digest algorithm 'md5'"):
        new_hasher("md5")
