"""The tcp transport passes the conformance kit third-party transports run."""

import pytest

from damselfly.plugins.transport.tcp import TcpConfig, TcpTransport
from damselfly.testing.transport import TransportConformance, tls_security


class TestTcpSendfileOff(TransportConformance):
    @pytest.fixture
    def transport(self):
        return TcpTransport(TcpConfig(sendfile=False))


class TestTcpDefaults(TransportConformance):
    @pytest.fixture
    def transport(self):
        return TcpTransport()


class TestTcpMutualTls(TransportConformance):
    @pytest.fixture
    def transport(self, tmp_path):
        t = TcpTransport()
        t.security = tls_security(tmp_path)
        return t
