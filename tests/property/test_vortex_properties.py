"""Properties of the Vortex codec: every frame round-trips, whatever the split; any bytes
in any split end in events or ``ProtocolError``, and the decoder never holds more than
one bounded frame."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damselfly.core import vortex
from damselfly.core.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)

# what a decoder waiting for more may hold: the largest frame it buffers whole (piece
# metadata with its length and header; an Error frame is 3 bytes smaller)
BOUND = vortex.HEADER_SIZE + 4 + vortex.MAX_METADATA_SIZE

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
hex_id = st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)

metadata = st.builds(
    vortex.PieceMetadata,
    number=u32,
    offset=u64,
    length=st.just(0),  # replaced by the data's length
    digest=st.text(max_size=80),
    parent_id=st.text(max_size=80),
    traffic_type=u8,
    cost_seconds=u64,
    created_at=st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    """One encoded frame and the events it decodes to (piece bytes joined into one PieceData)."""
    packet = draw(u8)
    kind = draw(st.sampled_from(["download", "piece", "close", "error"]))
    if kind == "download":
        task, number = draw(hex_id), draw(u32)
        return vortex.encode_download_piece(task, number, packet), [vortex.DownloadPiece(task, number, packet)]
    if kind == "piece":
        data = draw(st.binary(max_size=300))
        meta = draw(metadata)
        meta = vortex.PieceMetadata(
            meta.number, meta.offset, len(data), meta.digest, meta.parent_id,
            meta.traffic_type, meta.cost_seconds, meta.created_at,
        )  # fmt: skip
        body = [data] if data else []
        events = [vortex.PieceContentStart(meta, packet), *body, vortex.PieceContentEnd(packet)]
        return vortex.encode_piece_content(meta, data, packet), events
    if kind == "close":
        return vortex.encode_close(packet), [vortex.Close(packet)]
    code, message = draw(u8), draw(st.text(max_size=200))
    return vortex.encode_error(code, message, packet), [vortex.Error(code, message, packet)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


def decode(chunks: list[bytes], decoder: vortex.Decoder) -> list[object]:
    """Feed ``chunks`` one by one, draining after each; piece bytes are joined per piece."""
    out: list[object] = []
    for chunk in [*chunks, b""]:
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not vortex.NEED_DATA:
            if isinstance(event, vortex.PieceData):
                if out and isinstance(out[-1], bytes):
                    out[-1] += bytes(event.data)
                else:
                    out.append(bytes(event.data))
            else:
                out.append(event)
        assert len(decoder._buf) < BOUND
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(frames(), max_size=6), st.lists(st.integers(0, 10_000), max_size=12))
def test_every_frame_sequence_decodes_to_what_was_encoded_whatever_the_split(
    sequence: list[tuple[bytes, list[object]]], cuts: list[int]
) -> None:
    stream = b"".join(raw for raw, _ in sequence)
    expected = [event for _, events in sequence for event in events]
    assert decode(split(stream, cuts), vortex.Decoder(max_errors=len(sequence))) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10), st.integers(0, 1 << 17))
def test_arbitrary_bytes_end_in_events_or_a_protocol_error_within_the_buffer_bound(
    data: bytes, cuts: list[int], max_frame: int
) -> None:
    try:
        decode(split(data, cuts), vortex.Decoder(max_frame=max_frame, max_errors=2))
    except ProtocolError:
        pass


@settings(max_examples=80, deadline=None)
@given(frames(), st.integers(1, 400), st.binary(min_size=1, max_size=8))
def test_a_valid_frame_with_its_tail_cut_or_garbage_after_it_fails_cleanly(
    one: tuple[bytes, list[object]], keep: int, garbage: bytes
) -> None:
    raw, _ = one
    with pytest.raises(ProtocolError, match="stream ended"):
        decode([raw[: max(len(raw) - keep, 1)]], vortex.Decoder())
    try:
        decode([raw + garbage], vortex.Decoder())
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_piece_metadata_of_arbitrary_bytes_decodes_or_raises_protocol_error(raw: bytes) -> None:
    try:
        meta = vortex.decode_metadata(raw)
    except ProtocolError:
        return
    assert vortex.encode_metadata(meta) == raw  # what decodes is exactly one encoding
