"""The transport conformance kit run against the ``quic`` plugin."""

import pytest

from damselfly.plugins.transport.quic import QuicConfig, QuicTransport
from damselfly.testing.transport import TransportConformance, tls_security

pytest.importorskip("aioquic")


class TestQuic(TransportConformance):
    slow_piece_length = 24 << 20  # aioquic is pure Python: 64 MiB under tracemalloc takes minutes
    memory_bound = 12 << 20

    @pytest.fixture
    def transport(self, tmp_path):
        t = QuicTransport(QuicConfig(max_datagram_size=8192))
        t.state_dir = tmp_path / "quic"
        return t


class TestQuicMutualTls(TestQuic):
    """The same kit with the cluster's mutual TLS (``security.tls``) instead of a self-signed certificate."""

    @pytest.fixture
    def transport(self, tmp_path):
        t = QuicTransport(QuicConfig(max_datagram_size=8192))
        t.state_dir = tmp_path / "quic"
        t.security = tls_security(tmp_path)
        return t
