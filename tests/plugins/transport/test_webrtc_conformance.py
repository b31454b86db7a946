"""The transport conformance kit run against the ``webrtc`` plugin."""

import pytest

from damselfly.plugins.transport.webrtc import WebrtcTransport
from damselfly.testing.transport import TransportConformance

pytest.importorskip("aiortc")


class TestWebrtc(TransportConformance):
    slow_piece_length = 16 << 20  # aiortc is pure Python: 64 MiB under tracemalloc takes minutes
    memory_bound = 8 << 20

    @pytest.fixture
    def transport(self):
        return WebrtcTransport()
