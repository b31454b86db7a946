"""damselfly.rpc's client against both servers (its own and grpcio's), and a GOAWAY heard."""

import struct

import grpc
import pytest

from damselfly.rpc import Connection, RpcError
from damselfly.rpc.client import aiter_messages
from damselfly.rpc.framing import GOAWAY, NO_ERROR, frame
from tests.rpc.servicers import SERVICE, Echo, add_echo

pytestmark = pytest.mark.timeout(60)


async def test_native_client_against_both_servers(native):
    _, _, _, port, _ = native
    grpcio_server = grpc.aio.server()
    add_echo(grpcio_server, Echo())
    gport = grpcio_server.add_insecure_port("127.0.0.1:0")
    await grpcio_server.start()
    try:
        for p in (port, gport):
            conn = await Connection.open("127.0.0.1", p)
            try:
                for _ in range(3):  # the header table warms up: later calls send indices only
                    assert await conn.unary(f"/{SERVICE}/Unary", b"xyz", timeout=5) == b"zyx"
                with pytest.raises(RpcError) as err:
                    await conn.unary(f"/{SERVICE}/Unary", b"abort", timeout=5)
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                assert err.value.details == "no: ünïcode % 100"
                st = conn.stream(f"/{SERVICE}/Bidi")
                for i in range(100):
                    st.send(b"%d" % i)
                st.end()
                got = [m async for m in aiter_messages(st)]
                assert got == [b"%d!" % i for i in range(100)]
                reply = await conn.unary(f"/{SERVICE}/Big", b"\x02" * (1 << 20), timeout=20)
                assert reply == bytes(2 << 20)
            finally:
                conn.close()
    finally:
        await grpcio_server.stop(0)


async def test_client_calls_past_a_goaway_fail_as_unavailable():
    class Sink:
        def write(self, d: bytes) -> None:
            pass

    conn = Connection("x:1")
    conn.transport = Sink()
    st = conn.stream(f"/{SERVICE}/Unary")
    # the server went away having processed no stream of ours (last stream id 0)
    goaway = frame(GOAWAY, 0, 0, struct.pack(">II", 0, NO_ERROR))
    conn.data_received(goaway)
    with pytest.raises(RpcError) as err:
        await st.recv()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert err.value.details == "the server went away"
