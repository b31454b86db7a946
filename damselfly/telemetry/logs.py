"""Sinks for the CLI and the services; library code only logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from loguru import logger


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _format(record: dict) -> str:  # type: ignore[type-arg]
    """Time, level, module, message, and the task and peer ids a line is bound to."""
    ids = " ".join(f"{k}={{extra[{k}]}}" for k in ("task_id", "peer_id") if k in record["extra"])
    tail = f" <dim>[{ids}]</dim>" if ids else ""
    head = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{name}</cyan> {message}"
    return head + tail + "\n{exception}"


def setup(
    level: str = "INFO",
    json_format: bool = False,
    stream: object = None,
    keep: Callable[[Any], bool] | None = None,
) -> None:
    """Enable damselfly's logs on stderr and route grpc/aiohttp/asyncio logging into loguru;
    ``keep``, given a loguru record, says whether it is written."""
    logger.remove()
    logger.enable("damselfly")
    logger.add(
        stream or sys.stderr, level=level.upper(), format=_format, serialize=json_format, colorize=None, filter=keep
    )
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
