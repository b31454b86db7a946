"""``rdma``: Vortex frames over InfiniBand/RoCE verbs (extra ``rdma``: rdma-core's pyverbs).

What is here:

- detection: the plugin reports itself unavailable, with the reason, when pyverbs
  is missing or the host has no RDMA device, and a daemon configured with
  ``transports: [rdma, quic, tcp]`` then serves and uses the next transport;
- the queue-pair endpoint exchange, ``DfdaemonUpload.ExchangeIBVerbsQueuePairEndpoint``
  (a request and a response each holding one ``IBVerbsQueuePairEndpoint`` in field
  1). dragonfly-api 2.3.8 on PyPI has the endpoint message but neither the two
  wrappers nor the method, so they are declared here under the same names, and the
  handler is served on the daemon's upload server beside the generated servicer.

What is not: the verbs data path (reliable-connected queue pairs, registered
memory regions). This machine's kernel has no RDMA at all, so ``serve`` and
``connect`` refuse plainly even where a device exists, rather than run code that
never ran on hardware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
from dragonfly_api import dfdaemon_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, Transport
from damselfly.core.errors import Unavailable
from damselfly.hookspecs import hookimpl

SYSFS = Path("/sys/class/infiniband")
SERVICE = "dfdaemon.v2.DfdaemonUpload"
METHOD = "ExchangeIBVerbsQueuePairEndpoint"
Endpoint = dfdaemon_pb2.IBVerbsQueuePairEndpoint


def _exchange_messages() -> tuple[type, type]:
    """The request and response wrappers, from dragonfly-api when it has them."""
    names = ("ExchangeIBVerbsQueuePairEndpointRequest", "ExchangeIBVerbsQueuePairEndpointResponse")
    if all(hasattr(dfdaemon_pb2, n) for n in names):
        return tuple(getattr(dfdaemon_pb2, n) for n in names)  # type: ignore[return-value]
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(f"dfdaemon.v2.{names[0]}")
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name="damselfly/ibverbs_exchange.proto", package="dfdaemon.v2", syntax="proto3"
        )
        proto.dependency.append(dfdaemon_pb2.DESCRIPTOR.name)
        for n in names:
            field = proto.message_type.add(name=n).field.add(name="endpoint", number=1)
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
            field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            field.type_name = ".dfdaemon.v2.IBVerbsQueuePairEndpoint"
        pool.Add(proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"dfdaemon.v2.{n}")) for n in names)  # type: ignore[return-value]


ExchangeRequest, ExchangeResponse = _exchange_messages()


def exchange_handler(accept: Callable[[Any], Awaitable[Any]]) -> grpc.GenericRpcHandler:
    """The parent's side: ``accept`` takes the child's endpoint and returns its own."""

    async def exchange(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.HasField("endpoint") or not request.endpoint.gid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ExchangeIBVerbsQueuePairEndpoint needs an endpoint")
        return ExchangeResponse(endpoint=await accept(request.endpoint))

    handler = grpc.unary_unary_rpc_method_handler(
        exchange,
        request_deserializer=ExchangeRequest.FromString,
        response_serializer=ExchangeResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})


async def exchange_endpoints(channel: grpc.aio.Channel, local: Any, timeout: float) -> Any:
    """The child's side: send our queue pair's endpoint, get the parent's."""
    call = channel.unary_unary(
        f"/{SERVICE}/{METHOD}",
        request_serializer=ExchangeRequest.SerializeToString,
        response_deserializer=ExchangeResponse.FromString,
    )
    try:
        response = await call(ExchangeRequest(endpoint=local), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise Unavailable(f"rdma: the parent did not exchange endpoints: {exc.details()}") from None
    return response.endpoint


class RdmaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field("", description="Verbs device to use, e.g. mlx5_0 (empty: the first one found).")
    port_num: int = Field(1, ge=1, description="Port of the device.")
    gid_index: int = Field(0, ge=0, description="GID table index (RoCE v2 usually needs 3).")


def rdma_devices(sysfs: Path = SYSFS) -> list[str]:
    """The verbs devices the kernel lists, by name."""
    try:
        return sorted(p.name for p in sysfs.iterdir())
    except OSError:
        return []


def unavailable_reason(sysfs: Path = SYSFS) -> str | None:
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        return "pyverbs is not installed (pip install 'damselfly[rdma]'; it needs rdma-core's libibverbs)"
    if not sysfs.exists():
        return f"the kernel has no RDMA support ({sysfs} is absent)"
    if not rdma_devices(sysfs):
        return f"no RDMA device ({sysfs} is empty)"
    return "the verbs data path is not implemented yet (see the plugin's docstring)"


class RdmaTransport(Transport):
    name: ClassVar[str] = "rdma"
    Config = RdmaConfig
    options: RdmaConfig

    @classmethod
    def available(cls) -> str | None:
        return unavailable_reason()

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        raise Unavailable(f"rdma: {unavailable_reason()}")

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        raise Unavailable(f"rdma: {unavailable_reason()}")


@hookimpl
def damselfly_add_transports(registry):  # type: ignore[no-untyped-def]
    registry.add(RdmaTransport)
