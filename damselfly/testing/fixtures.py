"""pytest fixtures for projects that test against a real damselfly swarm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from damselfly.testing import Cluster, OriginProcess, start_cluster


@pytest.fixture
def damselfly_origin(tmp_path: Path) -> Iterator[OriginProcess]:
    """A counting HTTP origin serving ``tmp_path / "origin"``; ``.make(name, size)`` adds files."""
    origin = OriginProcess(tmp_path / "origin")
    try:
        yield origin
    finally:
        origin.stop()


@pytest.fixture
def damselfly_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``factory(peers=3, seed=True, env=None, peer_env=None, tls=False)`` starts a cluster on
    127.0.0.1 (its config allows loopback origins; ``tls=True``: mutual TLS with a fresh CA);
    all stop at teardown."""
    started: list[Cluster] = []

    def factory(peers: int = 3, **kwargs: Any) -> Cluster:
        c = start_cluster(tmp_path / f"cluster{len(started)}", peers, **kwargs)
        started.append(c)
        return c

    try:
        yield factory
    finally:
        for c in started:
            c.down()


@pytest.fixture(scope="session")
def damselfly_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 API (moto_server): ``.bucket()`` makes a fresh bucket, ``.requests(bucket)`` reads the log."""
    from damselfly.testing.s3 import s3_server

    yield from s3_server(tmp_path_factory.mktemp("s3"))
