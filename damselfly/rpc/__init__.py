"""The gRPC plumbing: damselfly's own HTTP/2 gRPC server and client, and protobuf helpers.

Services import the public names below and never a module's private ones.
"""

from damselfly.rpc.h2grpc import Connection, RpcError, Server, ServicerContext, callback_form
from damselfly.rpc.h2grpc import _Requests as RequestStream

__all__ = ["Connection", "RequestStream", "RpcError", "Server", "ServicerContext", "callback_form"]
