"""The storage conformance kit run against the built-in ``disk`` and ``memory`` storages, and
against the least storage the base class allows (whole pieces in a dict)."""

from typing import ClassVar

import pytest

from damselfly.contracts import BufferedPieceWriter, Storage
from damselfly.core.piece import PieceSpan
from damselfly.core.task import PieceRecord, Task
from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryConfig, MemoryStorage
from damselfly.testing.storage import StorageConformance, new_task, write_piece


class TestDisk(StorageConformance):
    @pytest.fixture
    def make_storage(self):
        return lambda data_dir: DiskStorage(data_dir, DiskConfig(persist_interval=0))


class TestDiskWithoutPreallocation(StorageConformance):
    @pytest.fixture
    def make_storage(self):
        return lambda data_dir: DiskStorage(data_dir, DiskConfig(persist_interval=0, preallocate=False))


class TestMemory(StorageConformance):
    persistent = False
    disk_backed = False

    @pytest.fixture
    def make_storage(self):
        return lambda data_dir: MemoryStorage(data_dir, MemoryConfig(capacity=64 << 20))


class _PieceWriter(BufferedPieceWriter):
    def __init__(self, storage: "DictStorage", task: Task, span: PieceSpan):
        super().__init__(span)
        self.storage, self.task, self.buf = storage, task, bytearray(span.length)

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        start = offset - self.span.offset
        self.buf[start : start + len(chunk)] = chunk

    def _keep(self, record: PieceRecord) -> None:
        self.storage.pieces[self.task.id, record.number] = bytes(self.buf)
        self.storage._piece_stored(self.task, record)


class DictStorage(Storage):
    """The least a storage that keeps whole pieces writes: everything else is the base's."""

    name: ClassVar[str] = "dict"

    def __init__(self, data_dir, options=None):
        super().__init__(data_dir, options)
        self.pieces: dict[tuple[str, int], bytes] = {}

    async def _create(self, task: Task) -> None:
        return None

    def _writer(self, task: Task, span: PieceSpan) -> _PieceWriter:
        return _PieceWriter(self, task, span)

    async def _read_piece(self, task: Task, record: PieceRecord) -> bytes:
        return self.pieces[task.id, record.number]

    async def _delete(self, task_id: str) -> None:
        self.pieces = {key: data for key, data in self.pieces.items() if key[0] != task_id}


class TestAStorageOfWholePiecesWritesOnlyWhatIsItsOwn(StorageConformance):
    persistent = False
    disk_backed = False

    @pytest.fixture
    def make_storage(self):
        return DictStorage


async def test_a_storage_that_can_read_nothing_says_which_method_it_lacks(tmp_path):
    class Unreadable(DictStorage):
        _read_piece = Storage._read_piece  # neither _read nor _read_piece of its own

    s = Unreadable(tmp_path)
    task = await s.create(new_task())
    await write_piece(s, task, 0)
    with pytest.raises(NotImplementedError, match="implements neither _read nor _read_piece"):
        await s.read_piece(task.id, 0)
