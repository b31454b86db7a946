"""The kit's stream base: two small transports on it pass the conformance kit, and it keeps the bounds."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from damselfly.config import LimitsConfig, SecurityConfig
from damselfly.contracts import ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import InvalidArgument, NotFound, PeerError
from damselfly.core.piece import digest
from damselfly.kit import StreamHandler, StreamServer, StreamTransport, split_address, unix_path
from damselfly.testing.transport import TASK_ID, Collector, TransportConformance, piece_bytes
from tests.helpers.waiting import wait_for

PIECE = piece_bytes(1, 100_000)


class LoopbackTransport(StreamTransport):
    """The base over TCP, in the eight lines a plugin would write."""

    name: ClassVar[str] = "loopback"

    async def start_server(self, handle: StreamHandler, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(handle, host, port)

    async def open_connection(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*split_address(address))


class SocketFileTransport(StreamTransport):
    """The base over a unix socket in a given directory."""

    name: ClassVar[str] = "socket-file"

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    async def start_server(self, handle: StreamHandler, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_unix_server(handle, self.directory / "vortex.sock")

    async def open_connection(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(unix_path(address))


class TestLoopback(TransportConformance):
    @pytest.fixture
    def transport(self):
        return LoopbackTransport()


class TestSocketFile(TransportConformance):
    refused_address = "unix:/nonexistent/damselfly/vortex.sock"

    @pytest.fixture
    def transport(self, tmp_path):
        return SocketFileTransport(tmp_path)


async def lookup(task_id: str, number: int) -> ServedPiece:
    if number != 1:
        raise NotFound(f"piece {number} is not here")
    return ServedPiece(vortex.PieceMetadata(1, 0, len(PIECE), digest(PIECE), "parent"), data=PIECE)


@contextlib.asynccontextmanager
async def serving(**limits: float) -> AsyncIterator[tuple[LoopbackTransport, StreamServer, str]]:
    """A loopback piece server bounded by ``limits``, the transport (bounded alike) and its address."""
    transport = LoopbackTransport()
    transport.security = SecurityConfig(limits=LimitsConfig(**limits))
    server = await transport.serve("127.0.0.1", 0, lookup)
    assert isinstance(server, StreamServer)
    try:
        yield transport, server, transport.served_address(server, "127.0.0.1")
    finally:
        await server.close()


async def fetch(transport: StreamTransport, address: str) -> bytes:
    conn = await transport.connect(address, 5)
    try:
        sink = Collector(len(PIECE))
        await sink.commit((await conn.fetch(TASK_ID, 1, sink)).digest)
        return sink.data
    finally:
        await conn.close()


def test_a_unix_address_names_a_socket_path():
    assert unix_path("unix:/run/damselfly/vortex.sock") == "/run/damselfly/vortex.sock"
    for bad in ("unix:", "127.0.0.1:4005", "/run/damselfly/vortex.sock"):
        with pytest.raises(InvalidArgument, match="expected unix:/path"):
            unix_path(bad)


async def test_a_server_on_a_unix_socket_advertises_its_path_and_removes_it_on_close(tmp_path):
    transport = SocketFileTransport(tmp_path)
    server = await transport.serve("0.0.0.0", 0, lookup)
    address = transport.served_address(server, "10.0.0.1")
    assert address == f"unix:{tmp_path / 'vortex.sock'}"
    assert await fetch(transport, address) == PIECE
    await server.close()
    assert not (tmp_path / "vortex.sock").exists()


async def test_a_server_on_an_ip_socket_advertises_the_daemons_ip_and_its_port():
    async with serving() as (transport, server, _):
        assert server.port > 0
        assert transport.served_address(server, "10.0.0.1") == f"10.0.0.1:{server.port}"


async def test_a_connection_past_the_cap_is_closed_at_once_and_the_held_one_works():
    async with serving(piece_connections=1) as (transport, server, address):
        held = await transport.connect(address, 5)
        await wait_for(lambda: server.connections == 1)
        reader, writer = await asyncio.open_connection(*split_address(address))
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # nothing said, no buffers
        writer.close()
        sink = Collector(len(PIECE))
        await held.fetch(TASK_ID, 1, sink)
        assert sink.data == PIECE
        await held.close()
        await wait_for(lambda: server.connections == 0)


async def test_an_idle_connection_is_closed_and_the_child_sees_it_broken():
    async with serving(piece_idle_timeout=0.3) as (transport, server, address):
        conn = await transport.connect(address, 5)
        try:
            sink = Collector(len(PIECE))
            await conn.fetch(TASK_ID, 1, sink)
            assert not conn.broken
            await wait_for(lambda: server.connections == 0)
            await wait_for(lambda: conn.broken)
            with pytest.raises(PeerError, match="closed the idle connection"):
                await conn.fetch(TASK_ID, 1, Collector(len(PIECE)))
        finally:
            await conn.close()


async def test_a_child_that_sends_no_request_gets_an_error_frame_and_is_hung_up_on():
    async with serving() as (_, server, address):
        reader, writer = await asyncio.open_connection(*split_address(address))
        writer.write(vortex.encode_error(vortex.ErrorCode.INTERNAL, "hello"))
        decoder = vortex.Decoder()
        decoder.receive_data(await asyncio.wait_for(reader.read(), 5))  # to the end of the stream
        decoder.receive_data(b"")
        event = decoder.next_event()
        assert isinstance(event, vortex.Error)
        assert event.code == vortex.ErrorCode.INVALID_ARGUMENT
        assert "unexpected Error" in event.message
        writer.close()
        await wait_for(lambda: server.connections == 0)


async def test_a_parent_past_the_error_frame_cap_is_dropped():
    async with serving(vortex_error_frames=2) as (transport, _, address):
        conn = await transport.connect(address, 5)
        try:
            for _ in range(2):
                with pytest.raises(NotFound):
                    await conn.fetch(TASK_ID, 2, Collector(0))
            with pytest.raises(PeerError, match="Error frames"):
                await conn.fetch(TASK_ID, 2, Collector(0))
            assert conn.broken
        finally:
            await conn.close()


async def test_a_connection_that_does_not_open_in_time_is_a_peer_error():
    class Stuck(LoopbackTransport):
        async def open_connection(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            await asyncio.Event().wait()
            raise AssertionError("never")

    with pytest.raises(PeerError, match=r"cannot connect to 10\.0\.0\.1:4005"):
        await Stuck().connect("10.0.0.1:4005", 0.05)


async def test_an_address_of_another_form_is_an_invalid_argument():
    with pytest.raises(InvalidArgument):
        await SocketFileTransport(Path("/nonexistent")).connect("127.0.0.1:4005", 1)
