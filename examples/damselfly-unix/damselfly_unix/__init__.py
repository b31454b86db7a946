"""``unix``: Vortex frames over a unix stream socket (an example third-party transport).

Built only on damselfly's public pieces: the plugin contract (``damselfly.contracts``),
the Vortex codec and the shared halves every transport uses
(``damselfly.plugins.transport.common``: ``answer`` on the parent's side,
``PieceResponse`` on the child's).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from damselfly import hookimpl
from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PeerError, ProtocolError
from damselfly.plugins.transport.common import ParentRefused, PieceResponse, answer

if TYPE_CHECKING:
    from damselfly.plugin_manager import Registry


PREFIX = "unix:"
BATCH = 1 << 20  # piece bytes handed to the storage at a time


class UnixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    socket_dir: Path | None = Field(None, description="Directory of the socket (default: the daemon's state dir).")


class _Server:
    def __init__(self, server: asyncio.AbstractServer, path: Path, handlers: set[asyncio.Task[None]]):
        self._server = server
        self.path = path
        self.port = 0
        self._handlers = handlers

    async def close(self) -> None:
        self._server.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self.path.unlink(missing_ok=True)


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lookup: PieceLookup) -> None:
    decoder = vortex.Decoder(max_frame=vortex.DOWNLOAD_PIECE_SIZE)
    try:
        while data := await reader.read(4096):
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not vortex.NEED_DATA:
                if isinstance(event, vortex.Close):
                    return
                if not isinstance(event, vortex.DownloadPiece):
                    raise ProtocolError(f"unexpected {type(event).__name__}")
                await answer(writer, lookup, event)
    except (ProtocolError, PeerError, ConnectionError):
        return  # hang up: the child sees the connection end
    finally:
        writer.close()


def _write_all(sink: PieceWriter, chunks: list[memoryview]) -> None:
    for c in chunks:
        sink.write(c)


class UnixConnection(PieceConnection):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._turn = asyncio.Lock()  # one request at a time, as on a TCP connection
        self._lost: Exception | None = None

    @property
    def broken(self) -> bool:
        return self._lost is not None

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        async with self._turn:
            if self._lost is not None:
                raise PeerError(f"connection is broken: {self._lost}")
            try:
                return await self._fetch(task_id, number, sink)
            except (NotFound, ParentRefused):
                raise
            except (DamselflyError, OSError, asyncio.CancelledError) as exc:
                self._lost = exc if isinstance(exc, DamselflyError) else PeerError(str(exc) or "cancelled")
                self._writer.close()
                if isinstance(exc, OSError):
                    raise self._lost from None
                raise

    async def _fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        self._writer.write(vortex.encode_download_piece(task_id, number))
        await self._writer.drain()
        resp = PieceResponse(number)
        pending: list[memoryview] = []
        size = 0
        while not resp.done:
            data = await self._reader.read(min(resp.piece_left or 4096, BATCH))
            parts = resp.feed(data)
            pending += parts
            size += sum(len(p) for p in parts)
            if pending and (size >= BATCH or resp.done):
                await asyncio.to_thread(_write_all, sink, pending)
                pending, size = [], 0
        assert resp.metadata is not None
        return resp.metadata

    async def close(self) -> None:
        if self._lost is None and not self._turn.locked():
            self._writer.write(vortex.encode_close())
        self._lost = self._lost or PeerError("closed")
        self._writer.close()


class UnixTransport(Transport):
    name: ClassVar[str] = "unix"
    Config = UnixConfig
    options: UnixConfig
    connections_per_parent: ClassVar[int] = 4

    def served_address(self, server: PieceServer, advertised_ip: str) -> str:
        assert isinstance(server, _Server)
        return PREFIX + str(server.path)

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        directory = self.options.socket_dir or self.state_dir or Path(tempfile.mkdtemp(prefix="damselfly-unix-"))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "vortex.sock"
        path.unlink(missing_ok=True)
        handlers: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await _serve_one(reader, writer, lookup)
            except asyncio.CancelledError:
                writer.close()
            finally:
                handlers.discard(task)

        server = await asyncio.start_unix_server(handle, path)
        return _Server(server, path, handlers)

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        if not address.startswith(PREFIX):
            raise InvalidArgument(f"bad piece address {address!r}, expected unix:/path")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address[len(PREFIX) :]), timeout)
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"cannot connect to {address}: {exc or 'timeout'}") from None
        return UnixConnection(reader, writer)


@hookimpl
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    registry.add(UnixTransport)
