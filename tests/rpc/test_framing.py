"""damselfly.rpc.framing with no sockets: two state machines talk in memory."""

import struct

import pytest

from damselfly.rpc.framing import (
    CANCEL,
    CONTINUATION,
    DEFAULT_WINDOW,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    RST_STREAM,
    WINDOW,
    Framing,
    Stream,
    decode_metadata,
    encode_headers,
    encode_metadata,
    frame,
    hpack_int,
    parse_timeout,
)

pytestmark = pytest.mark.timeout(30)


class Recorder(Framing):
    """One end that records what the framing hands it; a server end opens each new stream."""

    def __init__(self, is_client: bool):
        self.is_client = is_client
        super().__init__()
        self.events: list[tuple[object, ...]] = []

    def open(self, sid: int) -> Stream:
        st = self.streams[sid] = Stream(sid, self.peer_initial_window)
        return st

    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        if sid not in self.streams:
            self.open(sid)
        self.events.append(("headers", sid, end_stream, headers))
        if end_stream:
            self._on_remote_end(self.streams[sid])

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        self.events.append(("message", st.sid, data))

    def _message_too_big(self, st: Stream, n: int) -> None:
        self.events.append(("too big", st.sid, n))

    def _on_remote_end(self, st: Stream) -> None:
        st.remote_closed = True
        self.events.append(("end", st.sid))

    def _on_reset(self, st: Stream, code: int) -> None:
        self.events.append(("reset", st.sid, code))


def pump(a: Framing, b: Framing) -> None:
    """Move bytes both ways until neither end has anything to say."""
    while a.out or b.out:
        b.data_received(a.data_to_send())
        a.data_received(b.data_to_send())


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, off = [], 0
    while off + 9 <= len(data):
        hi, lo, kind, flags, sid = struct.unpack_from(">BHBBI", data, off)
        n = hi << 16 | lo
        out.append((kind, flags, sid, data[off + 9 : off + 9 + n]))
        off += 9 + n
    return out


REQUEST = [(b":method", b"POST"), (b":path", b"/test.Echo/Unary"), (b"content-type", b"application/grpc")]


def test_a_request_and_its_answer_cross_between_two_framings():
    client, server = Recorder(is_client=True), Recorder(is_client=False)
    client.initiate()
    server.initiate()
    pump(client, server)
    assert client.peer_initial_window == server.peer_initial_window == WINDOW  # the settings were exchanged

    st = client.open(1)
    client._send_headers(1, encode_headers(REQUEST), False)
    client._send_message(st, b"hello", end_stream=True)
    pump(client, server)
    assert server.events == [("headers", 1, False, REQUEST), ("message", 1, b"hello"), ("end", 1)]

    server._send_headers(1, encode_headers([(b":status", b"200")]), False)
    server._send_message(server.streams[1], b"olleh")
    server._send_headers(1, encode_headers([(b"grpc-status", b"0")]), True)
    server._local_done(server.streams[1])
    pump(client, server)
    assert client.events == [
        ("headers", 1, False, [(b":status", b"200")]),
        ("message", 1, b"olleh"),
        ("headers", 1, True, [(b"grpc-status", b"0")]),
        ("end", 1),
    ]
    assert 1 not in server.streams  # both halves are over


def test_a_message_past_the_default_window_waits_for_the_peers_settings_and_arrives_whole():
    client, server = Recorder(is_client=True), Recorder(is_client=False)
    client.initiate()
    server.initiate()
    st = client.open(1)
    client._send_headers(1, encode_headers(REQUEST), False)
    message = bytes(range(256)) * 400  # 100 KiB: past the 64 KiB windows HTTP/2 starts with
    client._send_message(st, message, end_stream=True)
    assert len(st.pending) == len(message) + 5 - DEFAULT_WINDOW and 1 in client.blocked
    pump(client, server)  # the server's SETTINGS and WINDOW_UPDATE open the windows
    assert not st.pending and not client.blocked
    assert server.events[1:] == [("message", 1, message), ("end", 1)]


def test_output_waits_for_window_even_when_a_window_went_negative():
    """A peer may shrink SETTINGS_INITIAL_WINDOW_SIZE below what is in flight (RFC 9113 6.9.2)."""
    conn = Framing()
    st = Stream(1, -10)
    conn.streams[1] = st
    conn._send_data(st, b"x" * 100)
    assert conn.data_to_send() == b""  # nothing may go out
    assert bytes(st.pending) == b"x" * 100
    st.window += 60  # the peer grants 60: 50 bytes may go now
    conn._drain_blocked()
    sent = conn.data_to_send()
    assert sent.endswith(b"x" * 50) and len(sent) == 9 + 50
    assert len(st.pending) == 50


def test_a_header_block_past_the_frame_size_goes_in_continuations_and_comes_back_whole():
    client, server = Recorder(is_client=True), Recorder(is_client=False)
    big = [*REQUEST, (b"x-big", b"v" * 40_000)]  # past the 16 KiB frames a peer takes by default
    client.initiate()
    client.open(1)
    client._send_headers(1, encode_headers(big), True)
    sent = client.data_to_send()
    kinds = [kind for kind, _, sid, _ in frames(sent[len(PREFACE) :]) if sid == 1]
    assert kinds == [HEADERS, CONTINUATION, CONTINUATION]
    server.data_received(sent)
    assert server.events == [("headers", 1, True, big), ("end", 1)]


def test_a_message_over_the_limit_is_refused_before_it_is_buffered():
    client, server = Recorder(is_client=True), Recorder(is_client=False)
    client.initiate()
    server.initiate()
    pump(client, server)
    client.open(1)
    client._send_headers(1, encode_headers(REQUEST), False)
    client._send_data(client.streams[1], struct.pack(">BI", 0, 17 << 20) + b"x" * 100)  # says 17 MiB
    pump(client, server)
    assert server.events[-1] == ("too big", 1, 17 << 20)


def test_a_ping_is_answered_and_garbage_ends_the_connection_with_goaway():
    server = Recorder(is_client=False)
    server.data_received(PREFACE + frame(PING, 0, 0, b"12345678"))
    assert frames(server.data_to_send()) == [(PING, 1, 0, b"12345678")]  # the ACK

    server = Recorder(is_client=False)
    server.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    kind, _, _, payload = frames(server.data_to_send())[-1]
    assert server.closed and kind == GOAWAY
    assert struct.unpack_from(">I", payload, 4)[0] == PROTOCOL_ERROR


def test_a_reset_is_sent_once_and_the_stream_forgotten():
    conn = Recorder(is_client=True)
    st = conn.open(1)
    conn.blocked[1] = st
    conn._reset(1, CANCEL)
    assert frames(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">I", CANCEL))]
    assert not conn.streams and not conn.blocked


def test_metadata_round_trips_through_header_fields():
    fields = encode_metadata([("X-Key", "v1"), ("x-blob-bin", b"\x00\xff")])
    assert fields == [(b"x-key", b"v1"), (b"x-blob-bin", b"AP8")]  # lowercased; unpadded base64
    got = decode_metadata([(b":path", b"/a"), (b"te", b"trailers"), *fields], frozenset({b"te"}))
    assert [(m.key, m.value) for m in got] == [("x-key", "v1"), ("x-blob-bin", b"\x00\xff")]


def test_hpack_integers_are_those_of_rfc_7541():
    assert hpack_int(10, 5) == b"\x0a"  # C.1.1
    assert hpack_int(1337, 5) == b"\x1f\x9a\x0a"  # C.1.2
    assert hpack_int(42, 8) == b"\x2a"  # C.1.3
    assert hpack_int(3, 7, 0x80) == b"\x83"  # the prefix's high bit kept


def test_timeouts_parse():
    assert parse_timeout(b"250m") == 0.25
    assert parse_timeout(b"2S") == 2.0
    assert parse_timeout(b"1H") == 3600.0
    assert parse_timeout(b"x") is None
    assert parse_timeout(b"123456789m") is None  # over 8 digits
