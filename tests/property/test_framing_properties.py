"""Properties of the HTTP/2 framing: whatever a peer sends after the preface, a framing
either goes on or ends with GOAWAY, never an unexpected exception and never more than one
incomplete frame buffered; HPACK integers, strings and gRPC metadata round-trip."""

import base64

import pytest
from hpack import Decoder
from hpack.hpack import decode_integer
from hypothesis import given, settings
from hypothesis import strategies as st

from damselfly.rpc import framing
from damselfly.rpc.framing import GOAWAY, PREFACE, Framing, H2Error, Stream

pytestmark = pytest.mark.timeout(60)

BOUND = framing.MAX_FRAME + 9  # the most a framing keeps of an incomplete frame


class Server(Framing):
    """A server end that opens each new stream and decodes its metadata, as the real one does."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []

    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        framing.decode_metadata(headers, frozenset())
        if sid not in self.streams and len(self.streams) < 64:
            self.streams[sid] = Stream(sid, self.peer_initial_window)

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        self.messages.append(data)

    def _message_too_big(self, st: Stream, n: int) -> None:
        self._reset(st.sid, framing.CANCEL)

    def _on_remote_end(self, st: Stream) -> None:
        st.remote_closed = True

    def _on_reset(self, st: Stream, code: int) -> None:
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)


def last_frame_kind(out: bytes) -> int:
    off, kind = 0, -1
    while off + 9 <= len(out):
        n = out[off] << 16 | out[off + 1] << 8 | out[off + 2]
        kind = out[off + 3]
        off += 9 + n
    assert off == len(out)  # what a framing sends is whole frames
    return kind


def feed(conn: Server, chunks: list[bytes]) -> None:
    for chunk in chunks:
        conn.data_received(chunk)
        assert len(conn.buf) <= BOUND
        assert len(conn.headers_block) <= 1 << 20
        if conn.closed:
            break
    if conn.closed:
        assert last_frame_kind(conn.data_to_send()) == GOAWAY


def frame_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(
        framing.frame,
        st.integers(0, 12),  # every type we know, and a few we do not
        st.integers(0, 0xFF),
        st.sampled_from([0, 1, 2, 3, 5, 0x80000001]),
        st.binary(max_size=40),
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_arbitrary_bytes_after_the_preface_go_on_or_end_in_goaway(data: bytes, step: int) -> None:
    conn = Server()
    conn.initiate()
    chunks = [PREFACE] + [data[i : i + step] for i in range(0, len(data), step)]
    feed(conn, chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_bytes(), max_size=12))
def test_arbitrary_frame_sequences_go_on_or_end_in_goaway(frames: list[bytes]) -> None:
    conn = Server()
    conn.initiate()
    feed(conn, [PREFACE, *frames])


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=60))
def test_anything_but_the_preface_first_ends_in_goaway(data: bytes) -> None:
    conn = Server()
    feed(conn, [data])
    assert conn.closed == (not PREFACE.startswith(data[: len(PREFACE)]))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 8))  # hpack decodes no longer varints
def test_an_hpack_integer_decodes_to_its_value(value: int, prefix_bits: int) -> None:
    encoded = framing.hpack_int(value, prefix_bits, first=0)
    assert decode_integer(encoded, prefix_bits) == (value, len(encoded))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200)), max_size=8))
def test_an_encoded_header_block_decodes_to_its_fields(headers: list[tuple[bytes, bytes]]) -> None:
    assert Decoder().decode(framing.encode_headers(headers), raw=True) == headers


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9-]{0,10}-bin", fullmatch=True), st.binary(max_size=50))))
def test_binary_metadata_round_trips(metadata: list[tuple[str, bytes]]) -> None:
    decoded = framing.decode_metadata(framing.encode_metadata(metadata), frozenset())
    assert [(m.key, m.value) for m in decoded] == metadata


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a-bin", b"b", b":path"]), st.binary(max_size=20)), max_size=5))
def test_metadata_of_any_header_values_decodes_or_is_a_protocol_error(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        decoded = framing.decode_metadata(headers, frozenset())
    except H2Error as exc:
        code = exc.code
    else:
        code = framing.NO_ERROR
        assert len(decoded) == sum(1 for k, _ in headers if k != b":path")
    assert code in (framing.NO_ERROR, framing.PROTOCOL_ERROR)


def test_malformed_binary_metadata_is_a_protocol_error_not_a_crash() -> None:
    """Found by the property above: one base64 character too many raised binascii.Error."""
    with pytest.raises(H2Error, match="binary metadata"):
        framing.decode_metadata([(b"x-bin", b"a")], frozenset())
    assert base64.b64encode(b"ok") == b"b2s="  # the well-formed kind still decodes:
    assert framing.decode_metadata([(b"x-bin", b"b2s")], frozenset())[0].value == b"ok"


def test_a_request_with_malformed_binary_metadata_ends_the_connection_with_goaway() -> None:
    conn = Server()
    conn.initiate()
    block = framing.encode_headers([(b":method", b"POST"), (b"x-bin", b"a")])
    feed(conn, [PREFACE, framing.frame(framing.HEADERS, framing.END_HEADERS, 1, block)])
    assert conn.closed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12))
def test_a_grpc_timeout_of_any_bytes_is_seconds_or_none(value: bytes) -> None:
    seconds = framing.parse_timeout(value)
    assert seconds is None or seconds >= 0
