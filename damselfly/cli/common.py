"""What the command groups share: one-line failures, the settings, the log sink, ready
files, request headers, and a call to the local daemon."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from damselfly.config import Settings, load_settings
from damselfly.core.errors import DamselflyError


def fail(message: str, code: int = 1) -> NoReturn:
    """Say ``message`` on stderr as one line and exit with ``code``."""
    click.echo(f"damselfly: error: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), **overrides)
    except DamselflyError as exc:
        fail(str(exc), 2)


def setup_logs(settings: Settings, quiet: bool = False) -> None:
    from damselfly.telemetry import logs

    logs.setup("WARNING" if quiet else settings.log.level, settings.log.json_format)


def write_ready(path: str | None, info: dict[str, Any]) -> None:
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def parse_headers(values: tuple[str, ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for h in values:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            fail(f"bad header {h!r}: expected 'Name: value'", 2)
        key = name.strip()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


def client_call(ctx: click.Context, socket_path: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
    """``Client.method(*args, **kwargs)`` on the local daemon (``socket_path``, else the
    configured one); an error is one line."""
    from damselfly.sdk.client import Client

    settings = settings_of(ctx)

    async def call() -> Any:
        async with Client(socket_path or settings.socket_path) as c:
            return await getattr(c, method)(*args, **kwargs)

    try:
        return asyncio.run(call())
    except DamselflyError as exc:
        fail(str(exc))
