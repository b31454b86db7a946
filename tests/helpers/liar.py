"""Storages of bad parents: one serves pieces with a byte flipped, one forges pieces that keep
their crc32, one stalls on every piece.

Loaded into a test daemon with ``DAMSELFLY_PLUGINS__LOAD='["tests.helpers.liar"]'`` and
``DAMSELFLY_DAEMON__STORAGE='{"type": "lying-disk"}'`` (or ``forging-disk``), it plays the
parent that sends a corrupt piece under a correct digest.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from typing import ClassVar

from damselfly import hookimpl
from damselfly.contracts import FileRegion
from damselfly.plugins.storage.disk import DiskStorage


class LyingDiskStorage(DiskStorage):
    name: ClassVar[str] = "lying-disk"

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        return None  # force the copy path so the bytes pass through read_piece

    async def read_piece(self, task_id: str, number: int) -> bytes:
        data = bytearray(await super().read_piece(task_id, number))
        if data:
            data[len(data) // 2] ^= 0xFF
        return bytes(data)


def _crc32_effect(x: int, tail: int) -> int:
    """How xoring the 4 bytes ``x`` (little-endian), ``tail`` bytes before the end, changes a crc32.

    CRC-32 is affine: two inputs of one length differ in crc by a linear function of the
    bytes they differ in, whatever comes before them."""
    return zlib.crc32(x.to_bytes(4, "little") + bytes(tail)) ^ zlib.crc32(bytes(4 + tail))


def forge_keeping_crc32(data: bytes, payload: bytes = b"EVIL", at: int = 0) -> bytes:
    """``data`` with ``payload`` written at ``at``, then a 4-byte patch xored into its last 4
    bytes (solved over GF(2)) that gives it back its crc32: what a parent forging a piece sends."""
    forged = bytearray(data)
    forged[at : at + len(payload)] = payload
    want = zlib.crc32(forged) ^ zlib.crc32(data)  # what the patch must cancel
    basis: dict[int, tuple[int, int]] = {}  # top bit of an effect -> (effect, the patch bits making it)
    for i in range(32):
        effect, bits = _crc32_effect(1 << i, 0), 1 << i
        for top in sorted(basis, reverse=True):
            if effect >> top & 1:
                effect, bits = effect ^ basis[top][0], bits ^ basis[top][1]
        if effect:
            basis[effect.bit_length() - 1] = (effect, bits)
    patch = 0
    for top in sorted(basis, reverse=True):
        if want >> top & 1:
            want, patch = want ^ basis[top][0], patch ^ basis[top][1]
    assert want == 0, "the 32 bits of a patch reach every crc32"
    for i, b in enumerate(patch.to_bytes(4, "little")):
        forged[len(data) - 4 + i] ^= b
    return bytes(forged)


class ForgingDiskStorage(DiskStorage):
    """Keeps pieces honestly and serves them forged: ``EVIL`` in the middle, crc32 kept, so the
    Vortex header's digest (the stored, honest one) still matches the bytes sent."""

    name: ClassVar[str] = "forging-disk"

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        return None  # every piece goes through read_piece

    async def read_piece(self, task_id: str, number: int) -> bytes:
        data = await super().read_piece(task_id, number)
        return forge_keeping_crc32(data, at=len(data) // 2) if len(data) >= 8 else data


@hookimpl
def damselfly_add_storages(registry):  # type: ignore[no-untyped-def]
    registry.add(LyingDiskStorage)
    registry.add(StallingDiskStorage)
    registry.add(ForgingDiskStorage)


class StallingDiskStorage(DiskStorage):
    """Keeps pieces honestly, but takes ``$DAMSELFLY_TEST_STALL_SECONDS`` to hand one out:
    the parent that is stuck on a piece (a dying disk, a frozen host)."""

    name: ClassVar[str] = "stalling-disk"

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        return None  # every piece goes through read_piece

    async def read_piece(self, task_id: str, number: int) -> bytes:
        await asyncio.sleep(float(os.environ.get("DAMSELFLY_TEST_STALL_SECONDS", "600")))
        return await super().read_piece(task_id, number)
