"""A task's whole content against the digests it is known by (an OCI blob's, a cache task's, the user's ``--digest``).

``ContentCheck`` hashes the pieces in order as they land, so the check at the end waits
only for what landed last; ``check_stored`` reads a task stored before this download.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable

from damselfly.contracts import Storage
from damselfly.core.errors import InvalidArgument, PieceCorrupt
from damselfly.core.piece import WEAK_ALGORITHM, Hasher, algorithm_of, crc32, new_hasher
from damselfly.core.task import Task
from damselfly.daemon.request import CONTENT_DIGESTS


def _content_hasher(expected: str) -> Hasher:
    algo = algorithm_of(expected).lower()
    if algo not in CONTENT_DIGESTS:
        raise InvalidArgument(f"unsupported digest {expected!r} (use sha256:, sha512:, sha1:, md5: or crc32:)")
    return new_hasher(algo) if algo == WEAK_ALGORITHM else hashlib.new(algo)


class ContentCheck:
    """A whole task's content against its known digests (an OCI blob's, the user's ``--digest``),
    hashed in piece order as pieces land, so the check at the end waits only for what landed
    last. The next piece in order is hashed as it is written (``continuation``: no second
    read); a piece that lands out of order is read back by a worker thread once the ones
    before it are in."""

    def __init__(
        self,
        read_piece: Callable[[int], Awaitable[bytes]],
        piece_count: int,
        expected: list[str],
        present: Iterable[int] = (),
    ):
        self.expected = expected
        self._hashers = [_content_hasher(e) for e in expected]
        self._read = read_piece
        self.piece_count = piece_count
        self.next = 0  # the first piece not hashed yet
        self._present: set[int] = set(present)  # stored, not hashed yet
        self._runner: asyncio.Task[None] | None = None

    def _catching_up(self) -> bool:
        return self._runner is not None and not self._runner.done()

    def continuation(self, number: int) -> list[Hasher] | None:
        """Copies of the running hashes for the writer of piece ``number`` to carry on with, as
        its bytes are written, when it is the next in order; None otherwise."""
        if number != self.next or self._catching_up():
            return None
        return [h.copy() for h in self._hashers]

    def landed(self, number: int, continued: list[Hasher] | None = None) -> None:
        """Piece ``number`` is stored; ``continued``: the ``continuation`` its writer carried on."""
        if continued is not None and number == self.next and not self._catching_up():
            self._hashers = continued
            self.next += 1
        else:
            self._present.add(number)
        if self.next in self._present and not self._catching_up():
            self._runner = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        while self.next in self._present:
            data = await self._read(self.next)
            await asyncio.to_thread(self._update, data)
            self._present.discard(self.next)
            self.next += 1

    def _update(self, data: bytes) -> None:
        for h in self._hashers:
            h.update(data)

    async def verify(self, present: Iterable[int]) -> None:
        """Hash whatever is left (``present``: every piece) and compare; PieceCorrupt on a mismatch."""
        if self._runner is not None:
            await self._runner
        self._present.update(present)
        await self._catch_up()
        if self.next != self.piece_count:
            raise PieceCorrupt(f"content digest: piece {self.next} is missing")
        for want, h in zip(self.expected, self._hashers, strict=True):
            got = h.hexdigest()
            if got.lower() != want.partition(":")[2].lower():
                raise PieceCorrupt(f"content digest mismatch: expected {want}, got {algorithm_of(want)}:{got}")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)


async def check_stored(storage: Storage, task: Task, expected: str) -> None:
    """Verify a stored task's whole content against ``algo:hex``; a mismatch drops the task."""
    algo, _, want = expected.partition(":")
    algo = algo.lower()
    if algo == "crc32":
        crc = 0
        async for chunk in storage.read_range(task.id, 0, task.content_length):
            crc = crc32(chunk, crc)
        got = str(crc)
    elif algo in ("sha256", "sha512", "md5", "sha1"):
        h = hashlib.new(algo)
        async for chunk in storage.read_range(task.id, 0, task.content_length):
            await asyncio.to_thread(h.update, chunk)
        got = h.hexdigest()
    else:
        raise InvalidArgument(f"unsupported digest {expected!r} (use sha256:, sha512:, md5: or crc32:)")
    if got.lower() != want.lower():
        await storage.delete(task.id)
        raise PieceCorrupt(f"content digest mismatch: expected {expected}, got {algo}:{got}")
