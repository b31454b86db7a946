"""RDMA detection: the reasons a host cannot run the rdma transport."""

import sys

import pytest

from damselfly.core.errors import PeerError, Unavailable
from damselfly.plugins.transport import rdma


def test_no_pyverbs_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    assert "pyverbs is not installed" in rdma.unavailable_reason(tmp_path)


def test_device_detection(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyverbs", object())
    assert "kernel has no RDMA support" in rdma.unavailable_reason(tmp_path / "absent")
    assert "no RDMA device" in rdma.unavailable_reason(tmp_path)
    (tmp_path / "mlx5_0").mkdir()
    assert rdma.rdma_devices(tmp_path) == ["mlx5_0"]
    assert rdma.unavailable_reason(tmp_path) is None


async def test_this_host_says_why_it_cannot():
    assert rdma.RdmaTransport.available()  # no RDMA on CI machines
    with pytest.raises(Unavailable, match="rdma"):
        await rdma.RdmaTransport().connect("127.0.0.1:1", 1)


async def test_queue_pair_endpoints_are_exchanged_beside_the_upload_service():
    """A real gRPC server with the generated DfdaemonUpload servicer and the exchange handler."""
    import grpc
    from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

    seen = []

    async def accept(endpoint):
        seen.append((endpoint.num, endpoint.lid, endpoint.gid))
        return rdma.Endpoint(num=900, lid=2, gid=b"\xfe\x80" + bytes(14))

    server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(dfdaemon_pb2_grpc.DfdaemonUploadServicer(), server)
    server.add_generic_rpc_handlers((rdma.exchange_handler(accept),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            mine = rdma.Endpoint(num=17, lid=1, gid=bytes(16))
            theirs = await rdma.exchange_endpoints(ch, mine, 5)
            assert (theirs.num, theirs.lid, theirs.gid) == (900, 2, b"\xfe\x80" + bytes(14))
            assert seen == [(17, 1, bytes(16))]
            # upstream's shape: the endpoint in field 1 of the request
            raw = rdma.ExchangeRequest(endpoint=mine).SerializeToString()
            assert raw[:1] == b"\x0a" and dfdaemon_pb2.IBVerbsQueuePairEndpoint.FromString(raw[2:]) == mine
            # an empty endpoint is refused with a clear message
            with pytest.raises(PeerError, match="needs an endpoint"):
                await rdma.exchange_endpoints(ch, rdma.Endpoint(), 5)
            # the generated servicer still answers its own methods
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id="x"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
