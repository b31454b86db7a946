"""``unix``: Vortex frames over a unix stream socket (an example third-party transport).

Built only on damselfly's public pieces: the plugin contract and the transport kit
(``damselfly.kit.StreamTransport``), which serves pieces, fetches them and bounds
both as the built-in transports do. This plugin says where its socket lies and
how to dial one; its addresses read ``unix:/path/to/vortex.sock``.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from damselfly import hookimpl
from damselfly.kit import StreamHandler, StreamTransport, unix_path

if TYPE_CHECKING:
    from damselfly.contracts import Registry, Transport


class UnixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    socket_dir: Path | None = Field(None, description="Directory of the socket (default: the daemon's state dir).")


class UnixTransport(StreamTransport):
    name: ClassVar[str] = "unix"
    Config = UnixConfig
    options: UnixConfig

    async def start_server(self, handle: StreamHandler, host: str, port: int) -> asyncio.Server:
        directory = self.options.socket_dir or self.state_dir or Path(tempfile.mkdtemp(prefix="damselfly-unix-"))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "vortex.sock"
        path.unlink(missing_ok=True)  # a socket left by a daemon that did not close
        return await asyncio.start_unix_server(handle, path)

    async def open_connection(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(unix_path(address))


@hookimpl
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    registry.add(UnixTransport)
