"""atheris harness: a server-side HTTP/2 framing fed a preface, then arbitrary bytes in splits.

Run: ``.venv/bin/python fuzz/h2_fuzz.py -max_total_time=120`` (see fuzz/README.md).
The framing must end any abuse with GOAWAY (``closed``), never raise, and never keep more
than one incomplete frame; every header block is decoded as gRPC metadata, as the server does.
"""

import sys

import atheris

with atheris.instrument_imports():
    from damselfly.rpc import framing
    from damselfly.rpc.framing import Framing, Stream


class Server(Framing):
    """A server end that opens each new stream and decodes its metadata, as the real one does."""

    def _on_headers(self, sid: int, end_stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
        framing.decode_metadata(headers, frozenset())
        for k, v in headers:
            if k == b"grpc-timeout":
                framing.parse_timeout(v)
        if sid not in self.streams and len(self.streams) < 64:
            self.streams[sid] = Stream(sid, self.peer_initial_window)

    def _message(self, st: Stream, compressed: int, data: bytes) -> None:
        pass

    def _message_too_big(self, st: Stream, n: int) -> None:
        self._reset(st.sid, framing.CANCEL)

    def _on_remote_end(self, st: Stream) -> None:
        st.remote_closed = True

    def _on_reset(self, st: Stream, code: int) -> None:
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)


BOUND = framing.MAX_FRAME + 9  # the most a framing keeps of an incomplete frame


def test_one_input(data: bytes) -> None:
    """Byte 0: the split (1-256 bytes a read); byte 1 odd: the preface is sent first; the
    rest is what the client sends (``make_seeds.py`` writes valid conversations)."""
    if len(data) < 2:
        return
    step = data[0] + 1
    stream = (framing.PREFACE if data[1] & 1 else b"") + data[2:]
    conn = Server()
    conn.initiate()
    for i in range(0, len(stream), step):
        conn.data_received(stream[i : i + step])  # must never raise: a broken peer gets GOAWAY
        assert len(conn.buf) <= BOUND
        assert len(conn.headers_block) <= 1 << 20
        if conn.closed:
            break


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
