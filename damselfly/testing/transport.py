"""A conformance kit for transport plugins.

A transport package subclasses ``TransportConformance`` in its own tests and
provides a ``transport`` fixture returning an instance of its plugin:

    from damselfly.testing.transport import TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def transport(self):
            return MyTransport()

The kit serves synthetic pieces through the plugin's own server and fetches them
with its own client: piece sizes from empty to the largest Dragonfly makes,
many requests at once on one connection, not-found and internal errors as
Vortex error frames, a lying, an oversized and a cut-off frame, a wrong digest,
a refused connection, a slow reader, and clean closes.

A transport that speaks mutual TLS runs the same kit with its ``security`` set to
``tls_security(directory)``: a fresh cluster CA and one certificate for
127.0.0.1 that both ends present. The bad frames come from
the plugin's own server, given pieces whose metadata lies or whose stored bytes
end early: a server must pass the lie on as it is and hang up (or reset the
stream) when the bytes run out, so the client is the one that must catch them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from damselfly.config import SecurityConfig, TlsConfig
from damselfly.contracts import BufferedPieceWriter, FileRegion, PieceServer, ServedPiece, Transport
from damselfly.core import vortex
from damselfly.core.errors import NotFound, PeerError, PieceCorrupt, ProtocolError
from damselfly.core.piece import MAX_PIECE_LENGTH, PieceSpan, digest
from damselfly.core.task import PieceRecord

MiB = 1 << 20
TASK_ID = "d" * 64
# piece number -> length: empty, one byte, a common piece, the largest piece
SIZES = {0: 0, 1: 1, 2: 4 * MiB, 3: MAX_PIECE_LENGTH}
BROKEN_PIECE = 99  # the server fails on this one
LYING_PIECE = 7  # served with another piece's number in its metadata
OVERSIZED_PIECE = 8  # its frame claims more bytes than any piece may have
CUT_PIECE = 9  # stored in a file shorter than its metadata: the parent breaks off mid-piece
BAD_DIGEST_PIECE = 10  # its bytes do not match its digest
SLOW_PIECE = 11  # a prefix of the largest piece, for the slow reader
CUT_LENGTH = 4 * MiB


def tls_security(directory: Path, name: str = "node", ips: tuple[str, ...] = ("127.0.0.1",)) -> SecurityConfig:
    """A SecurityConfig with mutual TLS: a new CA in ``directory/ca`` (reused if there) and a
    certificate ``name`` for ``ips`` signed by it, roles peer and seed."""
    from damselfly.security.certs import CA_CERT, init_ca, issue

    ca_dir = directory / "ca"
    if not (ca_dir / CA_CERT).exists():
        init_ca(ca_dir)
    issued = issue(ca_dir, directory, name, ips=list(ips), roles=("peer", "seed"))
    tls = TlsConfig.model_validate({"ca": ca_dir / CA_CERT, "cert": issued.cert, "key": issued.key})
    return SecurityConfig.model_validate({"tls": tls})


def piece_bytes(number: int, length: int) -> bytes:
    seed = hashlib.sha256(str(number).encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


class Collector(BufferedPieceWriter):
    """A piece writer that keeps the bytes, or only counts them (``keep=False``)."""

    def __init__(self, length: int, keep: bool = True, delay: float = 0.0):
        super().__init__(PieceSpan(0, 0, length))
        self.keep = keep
        self.delay = delay
        self.parts: list[bytes] = []
        self.record: PieceRecord | None = None

    def _put(self, chunk: bytes | memoryview, offset: int) -> None:
        if self.delay:
            time.sleep(self.delay)  # a slow disk: this runs in the transport's reader, off the loop
        if self.keep:
            self.parts.append(bytes(chunk))

    def _keep(self, record: PieceRecord) -> None:
        self.record = record

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


class TransportConformance:
    """Every transport plugin passes these; subclass and provide ``transport``.

    ``slow_piece_length`` is the piece the slow-reader test moves while counting
    every allocation; a transport whose protocol runs in pure Python (and so runs
    many times slower under ``tracemalloc``) may lower it, never below twice
    ``memory_bound``, so a transport that buffers a whole piece still fails.
    Addresses come from the plugin's ``served_address``, so a transport whose
    addresses are not ``host:port`` (a socket path) sets ``refused_address`` too.
    """

    slow_piece_length: int = MAX_PIECE_LENGTH
    memory_bound: int = 16 * MiB
    # where nothing listens, in the transport's own address form
    refused_address: str = "127.0.0.1:9"

    @pytest.fixture
    def transport(self) -> Transport:
        raise NotImplementedError("provide a `transport` fixture returning your plugin")

    @pytest.fixture
    def pieces(self) -> dict[int, bytes]:
        return {n: piece_bytes(n, length) for n, length in SIZES.items()}

    @pytest.fixture
    async def address(self, transport: Transport, pieces: dict[int, bytes], tmp_path: Path) -> AsyncIterator[str]:
        cut_file = tmp_path / "cut-piece"
        cut_file.write_bytes(piece_bytes(CUT_PIECE, CUT_LENGTH // 4))

        async def lookup(task_id: str, number: int) -> ServedPiece:
            if number == BROKEN_PIECE:
                raise RuntimeError("the disk is on fire")
            if number == LYING_PIECE:
                data = pieces[1]
                return ServedPiece(vortex.PieceMetadata(LYING_PIECE + 1, 0, len(data), digest(data)), data=data)
            if number == OVERSIZED_PIECE:
                meta = vortex.PieceMetadata(number, 0, vortex.DEFAULT_MAX_FRAME + 1, "crc32:00000000")
                return ServedPiece(meta, data=b"x" * 16)
            if number == CUT_PIECE:
                meta = vortex.PieceMetadata(number, 0, CUT_LENGTH, digest(piece_bytes(CUT_PIECE, CUT_LENGTH)))
                return ServedPiece(meta, region=FileRegion(cut_file, 0, CUT_LENGTH))
            if number == BAD_DIGEST_PIECE:
                data = pieces[2]
                return ServedPiece(vortex.PieceMetadata(number, 0, len(data), digest(data[:-1] + b"?")), data=data)
            if task_id != TASK_ID or number not in pieces:
                raise NotFound(f"piece {number} of {task_id[:12]} is not here")
            data = pieces[number]
            meta = vortex.PieceMetadata(number, 0, len(data), digest(data), "conformance-parent")
            return ServedPiece(meta, data=data)

        server: PieceServer = await transport.serve("127.0.0.1", 0, lookup)
        try:
            yield transport.served_address(server, "127.0.0.1")
        finally:
            await server.close()

    async def _fetch(self, transport: Transport, address: str, number: int, pieces: dict[int, bytes]) -> bytes:
        conn = await transport.connect(address, 5)
        try:
            sink = Collector(len(pieces[number]))
            meta = await conn.fetch(TASK_ID, number, sink)
            await sink.commit(meta.digest)
            return sink.data
        finally:
            await conn.close()

    @pytest.mark.parametrize("number", sorted(SIZES))
    async def test_piece_sizes(self, transport: Transport, address: str, pieces: dict[int, bytes], number: int) -> None:
        assert await self._fetch(transport, address, number, pieces) == pieces[number]

    async def test_many_requests_at_once_on_one_connection(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        conn = await transport.connect(address, 5)
        numbers = [0, 1, 2] * 6

        async def one(n: int) -> bytes:
            sink = Collector(len(pieces[n]))
            meta = await conn.fetch(TASK_ID, n, sink)
            await sink.commit(meta.digest)
            return sink.data

        try:
            got = await asyncio.gather(*(one(n) for n in numbers))
        finally:
            await conn.close()
        assert got == [pieces[n] for n in numbers]

    async def test_not_found_is_an_error_frame_and_the_connection_lives_on(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        conn = await transport.connect(address, 5)
        try:
            with pytest.raises(NotFound):
                await conn.fetch(TASK_ID, 42, Collector(0))
            with pytest.raises(PeerError, match="disk is on fire"):
                await conn.fetch(TASK_ID, BROKEN_PIECE, Collector(0))
            sink = Collector(1)
            meta = await conn.fetch(TASK_ID, 1, sink)
            await sink.commit(meta.digest)
            assert sink.data == pieces[1]
        finally:
            await conn.close()

    async def test_a_refused_connection_is_a_peer_error(self, transport: Transport) -> None:
        with pytest.raises(PeerError):
            await transport.connect(self.refused_address, 2)

    async def test_a_slow_reader_holds_back_the_sender(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        """A big piece to a reader that takes 10 ms per buffer: memory stays bounded."""
        assert self.slow_piece_length >= 2 * self.memory_bound
        data = pieces[3][: self.slow_piece_length]
        pieces[SLOW_PIECE] = data
        tracemalloc.start()
        try:
            conn = await transport.connect(address, 5)
            sink = Collector(len(data), keep=False, delay=0.01)
            baseline = tracemalloc.get_traced_memory()[0]
            meta = await conn.fetch(TASK_ID, SLOW_PIECE, sink)
            await sink.commit(meta.digest)
            peak = tracemalloc.get_traced_memory()[1] - baseline
            await conn.close()
        finally:
            tracemalloc.stop()
        assert sink.record is not None
        assert sink.record.digest == digest(data)
        assert peak < self.memory_bound, f"{peak / MiB:.1f} MiB held for a {len(data) // MiB} MiB piece"

    async def test_a_lying_frame_is_a_protocol_error(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        conn = await transport.connect(address, 5)
        try:
            with pytest.raises(ProtocolError, match="lying parent"):
                await conn.fetch(TASK_ID, LYING_PIECE, Collector(1))
        finally:
            await conn.close()
        assert await self._fetch(transport, address, 1, pieces) == pieces[1]

    async def test_an_oversized_frame_is_refused_before_its_bytes(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        conn = await transport.connect(address, 5)
        sink = Collector(16)
        try:
            with pytest.raises((ProtocolError, PeerError)):
                await conn.fetch(TASK_ID, OVERSIZED_PIECE, sink)
        finally:
            await conn.close()
        assert sink.data == b""
        assert await self._fetch(transport, address, 2, pieces) == pieces[2]

    async def test_a_parent_breaking_off_mid_piece_is_a_peer_error(
        self, transport: Transport, address: str, pieces: dict[int, bytes]
    ) -> None:
        conn = await transport.connect(address, 5)
        sink = Collector(CUT_LENGTH)
        try:
            with pytest.raises(PeerError):
                await asyncio.wait_for(conn.fetch(TASK_ID, CUT_PIECE, sink), 30)
        finally:
            await conn.close()
        assert len(sink.data) < CUT_LENGTH
        assert await self._fetch(transport, address, 1, pieces) == pieces[1]

    async def test_a_wrong_digest_is_caught_at_commit(self, transport: Transport, address: str) -> None:
        conn = await transport.connect(address, 5)
        try:
            sink = Collector(SIZES[2])
            meta = await conn.fetch(TASK_ID, BAD_DIGEST_PIECE, sink)
            with pytest.raises(PieceCorrupt):
                await sink.commit(meta.digest)
        finally:
            await conn.close()

    async def test_clean_close(self, transport: Transport, address: str, pieces: dict[int, bytes]) -> None:
        conn = await transport.connect(address, 5)
        await conn.close()
        await conn.close()  # twice is fine
        assert conn.broken
        with pytest.raises(PeerError):
            await conn.fetch(TASK_ID, 1, Collector(1))
        # the server is unharmed
        assert await self._fetch(transport, address, 2, pieces) == pieces[2]
