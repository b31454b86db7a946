"""One toy plugin of each kind, registered through each registry hook."""

from __future__ import annotations

from typing import ClassVar

from damselfly import hookimpl
from damselfly.contracts import PiecePicker, Source, SourceInfo, Strategy
from damselfly.plugins.storage.memory import MemoryStorage
from damselfly.plugins.transport.tcp import TcpTransport


class ToySource(Source):
    name: ClassVar[str] = "toy-source"
    schemes: ClassVar[tuple[str, ...]] = ("toy",)

    async def stat(self, url, headers):  # type: ignore[no-untyped-def]
        return SourceInfo(0)

    async def read(self, url, offset, length, headers):  # type: ignore[no-untyped-def]
        yield b""


class ToyTransport(TcpTransport):
    name: ClassVar[str] = "toy-transport"

    @classmethod
    def available(cls) -> str | None:
        return "needs a toy network card"


class ToyStorage(MemoryStorage):
    name: ClassVar[str] = "toy-storage"


class ToyStrategy(Strategy):
    name: ClassVar[str] = "toy-strategy"

    def rank(self, child, candidates, task):  # type: ignore[no-untyped-def]
        return list(reversed(candidates))


class ToyPicker(PiecePicker):
    name: ClassVar[str] = "toy-picker"

    def order(self, missing, holders):  # type: ignore[no-untyped-def]
        return sorted(missing, reverse=True)


@hookimpl
def damselfly_add_piece_pickers(registry):  # type: ignore[no-untyped-def]
    registry.add(ToyPicker)


@hookimpl
def damselfly_add_sources(registry):  # type: ignore[no-untyped-def]
    registry.add(ToySource)


@hookimpl
def damselfly_add_transports(registry):  # type: ignore[no-untyped-def]
    registry.add(ToyTransport)


@hookimpl
def damselfly_add_storages(registry):  # type: ignore[no-untyped-def]
    registry.add(ToyStorage)


@hookimpl
def damselfly_add_strategies(registry):  # type: ignore[no-untyped-def]
    registry.add(ToyStrategy)
