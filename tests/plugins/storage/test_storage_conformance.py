"""The storage conformance kit run against the built-in ``disk`` and ``memory`` storages."""

import pytest

from damselfly.plugins.storage.disk import DiskConfig, DiskStorage
from damselfly.plugins.storage.memory import MemoryConfig, MemoryStorage
from damselfly.testing.storage import StorageConformance


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
