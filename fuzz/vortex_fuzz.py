"""atheris harness: the Vortex decoder fed arbitrary bytes in arbitrary splits.

Run: ``.venv/bin/python fuzz/vortex_fuzz.py -max_total_time=120`` (see fuzz/README.md).
Anything but ``ProtocolError`` out of the decoder, or a buffer past its bound, is a finding.
"""

import sys

import atheris

with atheris.instrument_imports():
    from damselfly.core import vortex
    from damselfly.core.errors import ProtocolError

# the largest frame a decoder waits for whole: piece metadata (or an Error frame) and its header
BOUND = vortex.HEADER_SIZE + 4 + vortex.MAX_METADATA_SIZE


def test_one_input(data: bytes) -> None:
    """Byte 0: the split (1-256 bytes a read), byte 1: ``max_errors``, byte 2: a small
    ``max_frame`` when odd; the rest is the stream (``make_seeds.py`` writes valid ones)."""
    if len(data) < 3:
        return
    step, max_errors = data[0] + 1, data[1] % 8
    max_frame = data[2] << 8 if data[2] & 1 else vortex.DEFAULT_MAX_FRAME
    decoder = vortex.Decoder(max_frame=max_frame, max_errors=max_errors)
    stream = data[3:]
    try:
        for i in range(0, len(stream), step):
            decoder.receive_data(stream[i : i + step])
            while not isinstance(event := decoder.next_event(), type(vortex.NEED_DATA)):
                assert event is not None
            assert len(decoder._buf) < BOUND, len(decoder._buf)
        decoder.receive_data(b"")
        while not isinstance(decoder.next_event(), type(vortex.NEED_DATA)):
            pass
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
