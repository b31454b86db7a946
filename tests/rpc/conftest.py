"""The rpc tests' fixture: damselfly.rpc's server with the Echo and health servicers, and a grpcio channel to it."""

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from damselfly.rpc import Server
from tests.rpc.servicers import Echo, add_echo


@pytest.fixture
async def native():
    echo = Echo()
    server = Server()
    add_echo(server, echo)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
    yield channel, echo, server, port, hs
    await channel.close()
    await server.stop(0.5)
