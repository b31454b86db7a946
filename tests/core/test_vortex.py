"""The Vortex codec, sans-IO: two ends talking through plain bytes."""

import struct

import pytest

from damselfly.core import vortex
from damselfly.core.errors import ProtocolError
from damselfly.core.piece import digest

TASK = "a" * 64


def events(decoder: vortex.Decoder) -> list:
    out = []
    while (e := decoder.next_event()) is not vortex.NEED_DATA:
        out.append(e)
    return out


def piece_frame(data: bytes, number: int = 3, **kw) -> bytes:
    meta = vortex.PieceMetadata(number, number * 4096, len(data), digest(data), "parent-1", 1, 2, 1700000000, **kw)
    return vortex.encode_piece_content(meta, data)


def collect_piece(evs: list) -> tuple[vortex.PieceMetadata, bytes]:
    assert isinstance(evs[0], vortex.PieceContentStart)
    assert isinstance(evs[-1], vortex.PieceContentEnd)
    body = b"".join(bytes(e.data) for e in evs[1:-1])
    return evs[0].metadata, body


def test_download_piece_round_trip():
    d = vortex.Decoder()
    d.receive_data(vortex.encode_download_piece(TASK, 7, packet_id=9))
    assert events(d) == [vortex.DownloadPiece(TASK, 7, 9)]


def test_download_piece_layout_is_dragonflys():
    raw = vortex.encode_download_piece(TASK, 258)
    assert raw[:6] == bytes([0, 0]) + struct.pack(">I", 68)
    assert raw[6:70] == TASK.encode()
    assert raw[70:] == struct.pack(">I", 258)


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_piece_content_round_trip(size):
    data = bytes(i % 251 for i in range(size))
    d = vortex.Decoder()
    d.receive_data(piece_frame(data))
    meta, body = collect_piece(events(d))
    assert body == data
    assert meta.number == 3 and meta.length == size and meta.digest == digest(data)
    assert meta.parent_id == "parent-1" and meta.cost_seconds == 2 and meta.created_at == 1700000000


def test_piece_content_fed_one_byte_at_a_time():
    data = b"0123456789" * 50
    raw = piece_frame(data) + vortex.encode_close()
    d = vortex.Decoder()
    got = []
    for i in range(len(raw)):
        d.receive_data(raw[i : i + 1])
        got.extend(events(d))
    _, body = collect_piece(got[:-1])
    assert body == data
    assert got[-1] == vortex.Close()


def test_two_frames_in_one_chunk():
    raw = piece_frame(b"abc", 1) + piece_frame(b"defg", 2)
    d = vortex.Decoder()
    d.receive_data(raw)
    evs = events(d)
    starts = [e for e in evs if isinstance(e, vortex.PieceContentStart)]
    assert [s.metadata.number for s in starts] == [1, 2]
    assert b"".join(bytes(e.data) for e in evs if isinstance(e, vortex.PieceData)) == b"abcdefg"


def test_error_and_close_frames():
    d = vortex.Decoder()
    d.receive_data(vortex.encode_error(vortex.ErrorCode.NOT_FOUND, "no such piece") + vortex.encode_close())
    assert events(d) == [vortex.Error(2, "no such piece"), vortex.Close()]


def test_truncated_frame_at_end_of_stream():
    raw = piece_frame(b"x" * 100)[:-10]
    d = vortex.Decoder()
    d.receive_data(raw)
    events(d)
    d.receive_data(b"")
    with pytest.raises(ProtocolError, match="ended"):
        d.next_event()


def test_truncated_header_at_end_of_stream():
    d = vortex.Decoder()
    d.receive_data(b"\x00\x00\x00")
    d.receive_data(b"")
    with pytest.raises(ProtocolError, match="header"):
        d.next_event()


def test_oversized_frame_is_rejected_before_it_is_read():
    d = vortex.Decoder(max_frame=1024)
    d.receive_data(struct.pack(">BBI", 0, 1, 10_000_000))
    with pytest.raises(ProtocolError, match="over the"):
        d.next_event()
    with pytest.raises(ProtocolError):  # the decoder stays broken
        d.next_event()


def test_lying_frame_length_disagrees_with_metadata():
    meta = vortex.PieceMetadata(0, 0, 100, "crc32:1")
    head = vortex.encode_piece_header(meta)
    # rewrite the header's length so the frame claims fewer piece bytes than the metadata
    lying = head[:2] + struct.pack(">I", struct.unpack(">I", head[2:6])[0] - 10) + head[6:]
    d = vortex.Decoder()
    d.receive_data(lying + b"x" * 90)
    with pytest.raises(ProtocolError, match="lying"):
        d.next_event()


def test_metadata_longer_than_its_frame():
    bad = struct.pack(">BBI", 0, 1, 8) + struct.pack(">I", 500) + b"\x00" * 4
    d = vortex.Decoder()
    d.receive_data(bad)
    with pytest.raises(ProtocolError, match="does not fit"):
        d.next_event()


def test_garbage_metadata():
    meta = b"\x00" * 5
    bad = struct.pack(">BBI", 0, 1, 4 + len(meta)) + struct.pack(">I", len(meta)) + meta
    d = vortex.Decoder()
    d.receive_data(bad)
    with pytest.raises(ProtocolError, match="truncated"):
        d.next_event()


def test_download_piece_with_wrong_length_or_non_hex_task():
    d = vortex.Decoder()
    d.receive_data(struct.pack(">BBI", 0, 0, 5) + b"12345")
    with pytest.raises(ProtocolError, match="expected 68"):
        d.next_event()
    d = vortex.Decoder()
    d.receive_data(struct.pack(">BBI", 0, 0, 68) + b"z" * 64 + b"\x00\x00\x00\x01")
    with pytest.raises(ProtocolError, match="not hex"):
        d.next_event()


def test_unknown_and_reserved_tags():
    for tag in (2, 7, 100):
        d = vortex.Decoder()
        d.receive_data(struct.pack(">BBI", 0, tag, 0))
        with pytest.raises(ProtocolError, match="unsupported"):
            d.next_event()


def test_close_with_a_body_is_rejected():
    d = vortex.Decoder()
    d.receive_data(struct.pack(">BBI", 0, 254, 1) + b"x")
    with pytest.raises(ProtocolError, match="Close"):
        d.next_event()


def test_encoder_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ProtocolError):
        vortex.encode_download_piece("short", 1)
    with pytest.raises(ProtocolError):
        vortex.encode_download_piece(TASK, 2**32)
    with pytest.raises(ProtocolError):
        vortex.encode_piece_content(vortex.PieceMetadata(0, 0, 5, "crc32:0"), b"1234")


@pytest.mark.parametrize(
    ("tag", "length", "match"),
    [
        (vortex.Tag.ERROR, vortex.MAX_ERROR_FRAME + 1, "Error frame of"),
        (vortex.Tag.DOWNLOAD_PIECE, 1 << 20, "expected 68"),
        (vortex.Tag.CLOSE, 1 << 20, "Close"),
        (100, 1 << 20, "unsupported"),
    ],
)
def test_every_frame_length_is_bounded_by_its_header_alone(tag, length, match):
    """Under ``max_frame`` but over what its tag allows: refused before a byte of the body is waited for."""
    d = vortex.Decoder()
    d.receive_data(struct.pack(">BBI", 0, tag, length))
    with pytest.raises(ProtocolError, match=match):
        d.next_event()


def test_the_longest_error_frame_the_encoder_makes_is_accepted():
    d = vortex.Decoder()
    d.receive_data(vortex.encode_error(vortex.ErrorCode.INTERNAL, "x" * (vortex.MAX_ERROR_MESSAGE + 100)))
    (event,) = events(d)
    assert isinstance(event, vortex.Error) and len(event.message) == vortex.MAX_ERROR_MESSAGE


def test_error_frames_past_max_errors_are_a_flood():
    d = vortex.Decoder(max_errors=2)
    frame = vortex.encode_error(vortex.ErrorCode.NOT_FOUND, "no")
    d.receive_data(frame * 2)
    assert len(events(d)) == 2 and d.errors == 2
    d.receive_data(frame)
    with pytest.raises(vortex.ErrorFlood, match="more than 2 Error frames"):
        d.next_event()
    with pytest.raises(ProtocolError):  # and the decoder stays broken
        d.next_event()


def test_the_default_error_cap_is_documented_and_strict():
    d = vortex.Decoder()
    assert d.max_errors == vortex.DEFAULT_MAX_ERRORS == 64
    d.receive_data(vortex.encode_error(vortex.ErrorCode.NOT_FOUND, "no") * 65)
    with pytest.raises(vortex.ErrorFlood):
        events(d)
    with pytest.raises(ValueError, match="max_errors"):
        vortex.Decoder(max_errors=-1)
