"""damselfly's source and strategy kits, run against this package's plugins."""

import pytest
from damselfly_hello import GREETING, HelloSource, IdleFirstStrategy

from damselfly.testing.source import Served, SourceConformance
from damselfly.testing.strategy import StrategyConformance

SIZE = 3 * 1024 * 1024 + 5


class TestHelloSource(SourceConformance):
    @pytest.fixture
    def source(self):
        return HelloSource()

    @pytest.fixture
    def origin(self):
        content = (GREETING * (SIZE // len(GREETING) + 1))[:SIZE]
        return Served(url=f"hello://{SIZE}", content=content, missing_url="hello://nothing")


class TestIdleFirstStrategy(StrategyConformance):
    @pytest.fixture
    def strategy(self):
        return IdleFirstStrategy()
