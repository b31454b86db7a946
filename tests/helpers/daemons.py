"""A real daemon in the test's process, started and stopped around a block."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from damselfly.config import load_settings
from damselfly.daemon.daemon import Daemon


@asynccontextmanager
async def daemon(tmp_path: Path, name: str = "d", **overrides: Any) -> AsyncIterator[Daemon]:
    """A started daemon with its data in ``tmp_path / name``; ``overrides`` are settings sections."""
    d = Daemon(load_settings(daemon={"data_dir": str(tmp_path / name), **overrides.pop("daemon", {})}, **overrides))
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
