"""The gRPC plumbing: damselfly's own HTTP/2 gRPC server and client, and protobuf helpers.

``framing`` is HTTP/2 and gRPC's message framing as a sans-IO state machine; ``endpoint``
binds it to asyncio; ``server`` and ``client`` are the two ends; ``wire`` converts between
core types and protobuf. Services import the public names below and never a module's
private ones.
"""

from damselfly.rpc.client import Connection, RpcError
from damselfly.rpc.endpoint import RequestStream
from damselfly.rpc.server import Server, ServicerContext, callback_form

__all__ = ["Connection", "RequestStream", "RpcError", "Server", "ServicerContext", "callback_form"]
