"""damselfly's transport conformance kit, run against this package's transport."""

import pytest
from damselfly_unix import UnixConfig, UnixTransport

from damselfly.testing.transport import TransportConformance


class TestUnix(TransportConformance):
    refused_address = "unix:/nonexistent/damselfly/vortex.sock"

    @pytest.fixture
    def transport(self, tmp_path):
        return UnixTransport(UnixConfig(socket_dir=tmp_path / "sock"))
