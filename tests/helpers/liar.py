"""Storages of bad parents: one serves pieces with a byte flipped, one stalls on every piece.

Loaded into a test daemon with ``DAMSELFLY_PLUGINS__LOAD='["tests.helpers.liar"]'`` and
``DAMSELFLY_DAEMON__STORAGE='{"type": "lying-disk"}'``, it plays the parent that sends
a corrupt piece under a correct digest.
"""

from __future__ import annotations

import asyncio
import os
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


@hookimpl
def damselfly_add_storages(registry):  # type: ignore[no-untyped-def]
    registry.add(LyingDiskStorage)
    registry.add(StallingDiskStorage)


class StallingDiskStorage(DiskStorage):
    """Keeps pieces honestly, but takes ``$DAMSELFLY_TEST_STALL_SECONDS`` to hand one out:
    the parent that is stuck on a piece (a dying disk, a frozen host)."""

    name: ClassVar[str] = "stalling-disk"

    def piece_region(self, task_id: str, number: int) -> FileRegion | None:
        return None  # every piece goes through read_piece

    async def read_piece(self, task_id: str, number: int) -> bytes:
        await asyncio.sleep(float(os.environ.get("DAMSELFLY_TEST_STALL_SECONDS", "600")))
        return await super().read_piece(task_id, number)
