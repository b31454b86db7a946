"""Every hook damselfly calls. Implementations use ``@damselfly.hookimpl``.

Registry hooks receive a registry and add plugin classes to it; behaviour hooks
are told what happened. Hooks are synchronous and never run an event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from damselfly.contracts import PiecePicker, Registry, Source, Storage, Strategy, Transport

PROJECT = "damselfly"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def damselfly_add_sources(registry: Registry[Source]) -> None:
    """Add ``Source`` classes: ``registry.add(HttpSource)``. Each serves its ``schemes``.

    A source's tests subclass ``damselfly.testing.source.SourceConformance``."""


@hookspec
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    """Add ``Transport`` classes that move Vortex frames between peers.

    A transport's tests subclass ``damselfly.testing.transport.TransportConformance``."""


@hookspec
def damselfly_add_storages(registry: Registry[Storage]) -> None:
    """Add ``Storage`` classes that keep pieces and task metadata.

    A storage's tests subclass ``damselfly.testing.storage.StorageConformance``."""


@hookspec
def damselfly_add_strategies(registry: Registry[Strategy]) -> None:
    """Add scheduling ``Strategy`` classes that rank candidate parents.

    A strategy's tests subclass ``damselfly.testing.strategy.StrategyConformance``."""


@hookspec
def damselfly_add_piece_pickers(registry: Registry[PiecePicker]) -> None:
    """Add ``PiecePicker`` classes that order a download's missing pieces."""


@hookspec
def damselfly_piece_verified(task_id: str, number: int, length: int, parent_id: str, traffic_type: int) -> None:
    """A piece passed its crc32 check and was stored; ``parent_id`` is empty from the source."""


@hookspec
def damselfly_piece_failed(task_id: str, number: int, parent_id: str, reason: str) -> None:
    """A piece could not be had from ``parent_id`` (corrupt, refused, vanished)."""


@hookspec
def damselfly_task_finished(task_id: str, url: str, content_length: int, peer_bytes: int, source_bytes: int) -> None:
    """A download finished on this daemon, with how many bytes came from peers and the source."""
