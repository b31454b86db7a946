"""Piece math and piece digests, as Dragonfly lays a task out."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from damselfly.core.errors import InvalidArgument, PieceCorrupt

try:  # ISA-L computes the same CRC-32 about three times as fast as zlib
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _crc32 = zlib.crc32

crc32: Callable[[bytes | bytearray | memoryview, int], int] = _crc32
"""``crc32(data, value=0)``: plain CRC-32 (zlib's), continued from ``value``."""

MiB = 1 << 20
MIN_PIECE_LENGTH = 4 * MiB
MAX_PIECE_LENGTH = 64 * MiB
# A piece length the user fixes may go below Dragonfly's 4 MiB floor (a damselfly extension):
# smaller pieces spread through a swarm in fewer piece-times, each being served on only once whole.
MIN_FIXED_PIECE_LENGTH = 64 * 1024
PIECES_TARGET = 500
DIGEST_ALGORITHM = "crc32"


def _next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def piece_length_for(content_length: int, fixed: int | None = None) -> int:
    """The piece length of a task: the user's (64 KiB to 64 MiB), else next_pow2(len / 500) in [4, 64] MiB.

    Upstream lets a user fix 4 to 64 MiB; damselfly also takes smaller fixed lengths. A fixed
    length is part of the task id, so such a task never mixes with one laid out by upstream's rule.
    """
    if fixed:
        if not MIN_FIXED_PIECE_LENGTH <= fixed <= MAX_PIECE_LENGTH:
            raise InvalidArgument(f"piece length {fixed} is outside [{MIN_FIXED_PIECE_LENGTH}, {MAX_PIECE_LENGTH}]")
        return fixed
    if content_length < 0:
        raise InvalidArgument(f"content length must not be negative, got {content_length}")
    length = _next_power_of_two(content_length // PIECES_TARGET)
    return min(max(length, MIN_PIECE_LENGTH), MAX_PIECE_LENGTH)


@dataclass(frozen=True, slots=True)
class PieceSpan:
    """Where one piece lies in its task."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Layout:
    """A task's content length cut into pieces of ``piece_length``."""

    content_length: int
    piece_length: int

    def __post_init__(self) -> None:
        if self.content_length < 0 or self.piece_length <= 0:
            raise InvalidArgument(f"bad layout: content length {self.content_length}, piece length {self.piece_length}")

    @classmethod
    def for_content(cls, content_length: int, fixed_piece_length: int | None = None) -> Layout:
        return cls(content_length, piece_length_for(content_length, fixed_piece_length))

    @property
    def piece_count(self) -> int:
        return -(-self.content_length // self.piece_length)

    def span(self, number: int) -> PieceSpan:
        if not 0 <= number < self.piece_count:
            raise InvalidArgument(f"piece {number} is outside 0..{self.piece_count - 1}")
        offset = number * self.piece_length
        return PieceSpan(number, offset, min(self.piece_length, self.content_length - offset))

    def spans(self) -> list[PieceSpan]:
        return [self.span(n) for n in range(self.piece_count)]

    def numbers_for_range(self, start: int, length: int) -> range:
        """The pieces that overlap bytes [start, start + length)."""
        if length <= 0 or start >= self.content_length:
            return range(0)
        end = min(start + length, self.content_length)
        return range(start // self.piece_length, (end - 1) // self.piece_length + 1)


def digest(data: bytes | bytearray | memoryview) -> str:
    """The Dragonfly piece digest, ``crc32:<decimal>``."""
    return f"{DIGEST_ALGORITHM}:{crc32(data, 0)}"


def verify(data: bytes | bytearray | memoryview, expected: str) -> None:
    """Raise PieceCorrupt unless ``data`` matches ``expected`` (``crc32:N``)."""
    algo, _, value = expected.partition(":")
    if algo != DIGEST_ALGORITHM or not value.isdigit():
        raise PieceCorrupt(f"unsupported piece digest {expected!r}")
    actual = crc32(data, 0)
    if actual != int(value):
        raise PieceCorrupt(f"piece digest mismatch: expected {expected}, got crc32:{actual}")


ByteRange = tuple[int, int]
"""(start, length) of a ranged download; None stands for the whole content."""


def covers(outer: ByteRange | None, inner: ByteRange | None, layout: Layout | None = None) -> bool:
    """Whether a download of ``outer`` (None: everything) brings every byte of ``inner``.

    With the task's ``layout`` the question is asked of whole pieces, which is what
    downloads fetch: a range of bytes 10-20 brings all of bytes 0-4MiB.
    """
    if outer is None:
        return True
    if layout is not None:
        want = layout.numbers_for_range(*inner) if inner is not None else range(layout.piece_count)
        have = layout.numbers_for_range(*outer)
        return not want or (bool(have) and have.start <= want.start and have.stop >= want.stop)
    if inner is None:
        return False
    return outer[0] <= inner[0] and outer[0] + outer[1] >= inner[0] + inner[1]


def share_blocks(piece_count: int, parts: int) -> list[range]:
    """Pieces 0..piece_count-1 as ``parts`` contiguous blocks of near-equal size (some empty
    when there are fewer pieces than parts): who reads which pieces of a shared source read."""
    if parts < 1:
        raise InvalidArgument(f"a task is shared among at least one reader, got {parts}")
    return [range(i * piece_count // parts, (i + 1) * piece_count // parts) for i in range(parts)]
