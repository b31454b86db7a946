"""The kit's exchange, sans-IO: requests and responses through the two halves in memory, no sockets."""

import pytest

from damselfly.config import LimitsConfig, SecurityConfig
from damselfly.contracts import FileRegion, ServedPiece
from damselfly.core import vortex
from damselfly.core.errors import Busy, Declined, InvalidArgument, NotFound, PeerError, ProtocolError
from damselfly.core.piece import digest
from damselfly.kit import (
    ParentRefused,
    PieceResponse,
    RequestReader,
    answer,
    error_frame,
    limits_of,
    split_address,
    tls_of,
)

TASK = "ab" * 32
DATA = bytes(range(256)) * 1000  # 256000 bytes


class Wire:
    """A FrameSink that keeps what ``answer`` writes and counts its drains."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.drains = 0

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    async def drain(self) -> None:
        self.drains += 1

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def serving(data: bytes = DATA):
    """A lookup that serves ``data`` as any piece asked for."""

    async def lookup(task_id: str, n: int) -> ServedPiece:
        return ServedPiece(vortex.PieceMetadata(n, 0, len(data), digest(data), "parent"), data=data)

    return lookup


def receive(response: PieceResponse, wire: bytes, step: int) -> bytes:
    """Feed ``wire`` to ``response`` ``step`` bytes at a time; the piece bytes it gives back."""
    out = bytearray()
    for i in range(0, len(wire), step):
        out += b"".join(response.feed(wire[i : i + step]))
    return bytes(out)


# -- the parent's side ---------------------------------------------------------------


def test_a_request_split_byte_by_byte_comes_out_whole_once():
    reader = RequestReader()
    wire = vortex.encode_download_piece(TASK, 5, packet_id=3)
    got = []
    for i in range(len(wire)):
        reader.receive_data(wire[i : i + 1])
        if (req := reader.next_request()) is not None:
            got.append(req)
    assert got == [vortex.DownloadPiece(TASK, 5, 3)]
    assert reader.next_request() is None


def test_a_message_of_requests_and_a_close_reads_in_order():
    reader = RequestReader()
    message = vortex.encode_download_piece(TASK, 1) + vortex.encode_download_piece(TASK, 2) + vortex.encode_close()
    assert reader.requests(message) == [vortex.DownloadPiece(TASK, 1), vortex.DownloadPiece(TASK, 2), None]


def test_a_close_ends_the_session():
    reader = RequestReader()
    reader.receive_data(vortex.encode_close())
    assert isinstance(reader.next_request(), vortex.Close)


def test_a_large_frame_from_a_child_is_refused_from_its_header_and_the_reader_stays_broken():
    reader = RequestReader()
    reader.receive_data(vortex.HEADER.pack(0, vortex.Tag.PIECE_CONTENT, 1 << 30))  # no body follows
    with pytest.raises(ProtocolError, match="over the"):
        reader.next_request()
    with pytest.raises(ProtocolError):
        reader.next_request()


def test_an_error_frame_from_a_child_is_a_protocol_error_and_no_request_is_read_after_it():
    reader = RequestReader()
    with pytest.raises(ProtocolError, match="unexpected Error from a child"):
        reader.requests(vortex.encode_error(vortex.ErrorCode.INTERNAL, "no"))
    with pytest.raises(ProtocolError, match="unexpected Error from a child"):
        reader.requests(vortex.encode_download_piece(TASK, 1))


# -- both halves ---------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 7, 4096, len(DATA) * 2])
async def test_an_answer_reads_back_as_the_piece_whatever_the_split(step):
    wire = Wire()
    await answer(wire, serving(), vortex.DownloadPiece(TASK, 4), slice_size=64 * 1024)
    response = PieceResponse(4)
    got = receive(response, wire.data, step)
    assert got == DATA
    assert response.done
    assert response.metadata == vortex.PieceMetadata(4, 0, len(DATA), digest(DATA), "parent")


async def test_an_answer_drains_after_every_slice():
    wire = Wire()
    await answer(wire, serving(), vortex.DownloadPiece(TASK, 1), slice_size=64 * 1024)
    assert wire.drains == 4  # 256000 bytes in 65536-byte slices
    assert max(len(p) for p in wire.parts[1:]) == 64 * 1024


async def test_a_stored_piece_is_released_once_sent(tmp_path):
    path = tmp_path / "piece"
    path.write_bytes(DATA)
    released = []

    async def lookup(task_id: str, n: int) -> ServedPiece:
        meta = vortex.PieceMetadata(n, 0, len(DATA), digest(DATA))
        return ServedPiece(meta, region=FileRegion(path, 0, len(DATA)), release=lambda: released.append(n))

    wire = Wire()
    await answer(wire, lookup, vortex.DownloadPiece(TASK, 2))
    assert receive(PieceResponse(2), wire.data, 1 << 20) == DATA
    assert released == [2]


async def test_a_stored_piece_shorter_than_its_metadata_breaks_off_after_the_header(tmp_path):
    path = tmp_path / "piece"
    path.write_bytes(DATA[:1000])

    async def lookup(task_id: str, n: int) -> ServedPiece:
        return ServedPiece(vortex.PieceMetadata(n, 0, len(DATA), digest(DATA)), region=FileRegion(path, 0, len(DATA)))

    wire = Wire()
    with pytest.raises(PeerError, match="cut short on disk"):
        await answer(wire, lookup, vortex.DownloadPiece(TASK, 2))
    response = PieceResponse(2)
    assert receive(response, wire.data, 4096) == b""  # the header went out; the bytes never did
    with pytest.raises(PeerError, match="hung up"):
        response.feed(b"")


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (NotFound("gone"), NotFound),
        (Busy("slots"), Busy),
        (Declined("sent"), Declined),
        (InvalidArgument("bad"), ParentRefused),
        (RuntimeError("disk on fire"), ParentRefused),
    ],
)
async def test_a_failed_lookup_reaches_the_child_as_its_error_and_the_connection_reads_on(failure, raised):
    async def lookup(task_id: str, n: int) -> ServedPiece:
        if n == 9:
            raise failure
        return ServedPiece(vortex.PieceMetadata(n, 0, 3, digest(b"abc")), data=b"abc")

    refused, served = Wire(), Wire()
    await answer(refused, lookup, vortex.DownloadPiece(TASK, 9))
    await answer(served, lookup, vortex.DownloadPiece(TASK, 1))
    decoder = vortex.Decoder()  # the connection's: one answer after the other on its byte stream
    with pytest.raises(raised, match=str(failure)):
        PieceResponse(9, decoder=decoder).feed(refused.data)
    assert b"".join(PieceResponse(1, decoder=decoder).feed(served.data)) == b"abc"


def test_error_frames_carry_their_codes():
    codes = {
        vortex.ErrorCode.DECLINED: Declined("x"),
        vortex.ErrorCode.UNAVAILABLE: Busy("x"),
        vortex.ErrorCode.NOT_FOUND: NotFound("x"),
        vortex.ErrorCode.INVALID_ARGUMENT: InvalidArgument("x"),
        vortex.ErrorCode.INTERNAL: OSError("x"),
    }
    for code, exc in codes.items():
        decoder = vortex.Decoder()
        decoder.receive_data(error_frame(exc, packet_id=7))
        assert decoder.next_event() == vortex.Error(code, "x", 7)


def test_a_piece_other_than_the_one_asked_for_is_a_lie():
    wire = vortex.encode_piece_content(vortex.PieceMetadata(3, 0, 3, digest(b"abc")), b"abc")
    with pytest.raises(ProtocolError, match="lying parent"):
        PieceResponse(2).feed(wire)


def test_a_stream_that_ends_before_the_piece_is_a_peer_error_not_a_lie():
    wire = vortex.encode_piece_content(vortex.PieceMetadata(3, 0, len(DATA), digest(DATA)), DATA)
    response = PieceResponse(3)
    response.feed(wire[:1000])
    assert response.piece_left > 0
    with pytest.raises(PeerError, match="hung up"):
        response.feed(b"")


def test_too_many_error_frames_drop_the_connection():
    decoder = vortex.Decoder(max_errors=2)
    frame = vortex.encode_error(vortex.ErrorCode.NOT_FOUND, "no")
    for _ in range(2):
        with pytest.raises(NotFound):
            PieceResponse(1, decoder=decoder).feed(frame)
    with pytest.raises(PeerError, match="dropping the connection"):
        PieceResponse(1, decoder=decoder).feed(frame)


# -- settings and addresses ----------------------------------------------------------


def test_bare_use_is_bounded_by_the_default_limits_and_speaks_plaintext():
    assert limits_of(None) == LimitsConfig()
    assert tls_of(None) is None
    security = SecurityConfig(limits=LimitsConfig(piece_connections=3))
    assert limits_of(security).piece_connections == 3
    assert tls_of(security) is None  # no certificate configured


def test_addresses_split_into_host_and_port():
    assert split_address("10.0.0.1:4005") == ("10.0.0.1", 4005)
    assert split_address("[::1]:65000") == ("::1", 65000)
    for bad in ("10.0.0.1", ":4005", "host:port", "unix:/run/vortex.sock"):
        with pytest.raises(InvalidArgument, match="expected host:port"):
            split_address(bad)
