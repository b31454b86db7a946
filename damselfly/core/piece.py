"""Piece math and piece digests, as Dragonfly lays a task out.

Two digests per piece. ``crc32:<decimal>`` is what the Vortex frame header carries, for
Dragonfly compatibility; it catches transmission errors but anyone can forge it (CRC-32 is
linear: a 4-byte patch restores it after any change). The strong digest, ``sha256:<hex>`` or
``blake3:<hex>``, is computed by whoever read the piece from the source, reported to the
scheduler, and checked by every child before it stores the piece.

Measured on the project's 2-core VM (2026-12-07, one thread): sha256 (hashlib, SHA-NI) hashes
1.8 GB/s, blake3 6.4 GB/s, crc32 (ISA-L) 58 GB/s. A piece writer's CPU per GiB (memory storage,
crc32 included) is 0.11 s alone, 0.30 s with blake3, 0.93 s with sha256; one peer fetching 512
MiB from a seed (benchmarks/seed_throughput.py, two sittings beside other work) ran at 0.60-0.69x
crc32's throughput with sha256, 0.75-1.01x with blake3. Default: blake3
(``DEFAULT_STRONG_ALGORITHM``), as strong as sha256 (a 256-bit cryptographic hash) and 3.5x
cheaper, the only one within reach of crc32's throughput here; sha256 is there for sites that
must use a FIPS-approved hash. Either runs in the thread that writes the piece, in that pass.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


STRONG_ALGORITHMS = ("sha256", "blake3")
DEFAULT_STRONG_ALGORITHM = "blake3"  # the faster of two equally strong digests (see above)
WEAK_ALGORITHM = DIGEST_ALGORITHM  # crc32: upstream Dragonfly's, forgeable


class Hasher(Protocol):
    """What hashlib's and blake3's hash objects have in common."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...

    def copy(self) -> Hasher: ...


class _Crc32Hasher:
    """crc32 behind the ``Hasher`` face: upstream's weak mode, where the strong digest is crc32."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self._crc = crc32(data, self._crc)

    def hexdigest(self) -> str:
        return str(self._crc)  # crc32 digests are decimal, as Dragonfly writes them

    def copy(self) -> _Crc32Hasher:
        twin = _Crc32Hasher()
        twin._crc = self._crc
        return twin


def new_hasher(algorithm: str) -> Hasher:
    """A running hash for a piece digest: ``sha256``, ``blake3`` or (weak) ``crc32``."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError:  # pragma: no cover - blake3 is a dependency
            raise InvalidArgument("piece digest blake3 needs the blake3 package (pip install blake3)") from None
        return blake3()
    if algorithm == WEAK_ALGORITHM:
        return _Crc32Hasher()
    raise InvalidArgument(f"unsupported piece digest algorithm {algorithm!r} (use sha256, blake3 or crc32)")


def algorithm_of(piece_digest: str) -> str:
    """The algorithm of a digest string, ``sha256`` for ``sha256:ab12...``."""
    return piece_digest.partition(":")[0]


def format_digest(algorithm: str, hasher: Hasher) -> str:
    return f"{algorithm}:{hasher.hexdigest()}"


def strong_digest(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """The piece digest of ``data`` under ``algorithm`` (``sha256:<hex>``, ``blake3:<hex>``, ``crc32:<n>``)."""
    h = new_hasher(algorithm)
    h.update(data)
    return format_digest(algorithm, h)


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
