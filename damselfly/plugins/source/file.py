"""``file://`` origins: a local path, read in chunks off the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import unquote, urlsplit

from damselfly.contracts import Source, SourceEntry, SourceInfo
from damselfly.core.errors import BackendError, PermissionDenied
from damselfly.hookspecs import hookimpl
from damselfly.rpc.wire import redact_url
from damselfly.security import admission

if TYPE_CHECKING:
    from damselfly.contracts import Registry


CHUNK = 1 << 20


def _path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise BackendError(f"file url {redact_url(url)!r} names a remote host")
    return Path(unquote(parts.path))


async def _open(path: Path) -> int:
    """Open ``path`` for reading: as the local caller the download serves, where it is not the
    daemon's own user (``admission.open_local``), so that the kernel checks every open."""
    adm = admission.current()
    try:
        if adm is not None and adm.open_local is not None:
            return await adm.open_local(str(path))
        return await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(f"no such file: {path}", status_code=404) from None
    except IsADirectoryError:
        raise BackendError(f"{path} is a directory", status_code=400) from None
    except PermissionDenied:
        raise
    except OSError as exc:
        raise BackendError(f"cannot open {path}: {exc.strerror}", status_code=403) from None


class FileSource(Source):
    name: ClassVar[str] = "file"
    schemes: ClassVar[tuple[str, ...]] = ("file",)

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        path = _path(url)
        fd = await _open(path)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return SourceInfo(st.st_size, True, {})

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        path = _path(url)
        fd = await _open(path)
        try:
            left = length
            while left > 0:
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, left), offset)
                if not chunk:
                    raise BackendError(f"{path} ended {left} bytes early")
                offset += len(chunk)
                left -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        root = _path(url)
        entries = []
        for p in sorted(root.rglob("*")):
            entries.append(SourceEntry(p.as_uri(), p.stat().st_size if p.is_file() else 0, p.is_dir()))
        return entries


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(FileSource)
