"""damselfly's storage conformance kit, run against this package's storage."""

import pytest
from damselfly_sqlite import SqliteStorage

from damselfly.testing.storage import StorageConformance


class TestSqlite(StorageConformance):
    @pytest.fixture
    def make_storage(self):
        return SqliteStorage  # called with the data directory
