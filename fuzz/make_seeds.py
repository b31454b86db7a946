"""Write seed corpora of valid inputs for the harnesses: ``fuzz/corpus/{vortex,h2}/``.

Run: ``.venv/bin/python fuzz/make_seeds.py``. Each seed starts with the harness's
parameter bytes (see each ``test_one_input``) and goes on with a well-formed stream,
so the fuzzer mutates real frames instead of finding their layout first.
"""

from pathlib import Path

from damselfly.core import vortex
from damselfly.rpc import framing

HERE = Path(__file__).parent / "corpus"


class Client(framing.Framing):
    is_client = True


def vortex_seeds() -> list[bytes]:
    meta = vortex.PieceMetadata(3, 12288, 5, "crc32:12345678", "parent-1", 1, 2, 1700000000)
    piece = vortex.encode_piece_content(meta, b"hello", packet_id=7)
    ask = vortex.encode_download_piece("a" * 64, 3, packet_id=7)
    error = vortex.encode_error(vortex.ErrorCode.NOT_FOUND, "no such piece", packet_id=7)
    streams = [ask, piece, ask + piece + vortex.encode_close(7), error + error, ask + error + piece]
    return [bytes((step, 4, 0)) + s for s in streams for step in (0, 7, 255)]


def h2_seeds() -> list[bytes]:
    client = Client()
    client.initiate()
    opening = client.data_to_send()[len(framing.PREFACE) :]
    request = [
        (b":method", b"POST"),
        (b":path", b"/scheduler.v2.Scheduler/AnnouncePeer"),
        (b"content-type", b"application/grpc"),
        (b"grpc-timeout", b"5S"),
        (b"x-token-bin", b"aGVsbG8"),
    ]
    block = framing.encode_headers(request)
    headers = framing.frame(framing.HEADERS, framing.END_HEADERS, 1, block)
    split = framing.frame(framing.HEADERS, 0, 3, block[:10]) + framing.frame(
        framing.CONTINUATION, framing.END_HEADERS, 3, block[10:]
    )
    message = framing.frame(framing.DATA, framing.END_STREAM, 1, framing.MESSAGE_PREFIX.pack(0, 3) + b"abc")
    ping = framing.frame(framing.PING, 0, 0, b"12345678")
    update = framing.frame(framing.WINDOW_UPDATE, 0, 1, framing.U32.pack(1000))
    reset = framing.frame(framing.RST_STREAM, 0, 1, framing.U32.pack(framing.CANCEL))
    conversations = [opening, opening + headers + message, opening + split + ping + update + reset]
    return [bytes((step, 1)) + c for c in conversations for step in (8, 255)]


def main() -> None:
    for name, seeds in (("vortex", vortex_seeds()), ("h2", h2_seeds())):
        folder = HERE / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            (folder / f"seed-{i}").write_bytes(seed)
        print(f"{len(seeds)} seeds in {folder}")


if __name__ == "__main__":
    main()
