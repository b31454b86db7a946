"""Servicers the rpc tests serve, on damselfly.rpc's server and on grpcio's."""

import asyncio

import grpc

from damselfly.rpc import Server, callback_form

SERVICE = "test.Echo"


class Echo:
    """A servicer on raw bytes (no protobuf), with one method per way a call can go."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.sleeping = asyncio.Event()
        self.metadata: tuple = ()

    async def unary(self, request: bytes, context) -> bytes:
        self.metadata = tuple(context.invocation_metadata())
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no: ünïcode % 100")
        if request == b"raise":
            raise RuntimeError("boom")
        if request == b"sleep":
            self.sleeping.set()
            await asyncio.Event().wait()  # until the call is cancelled
        return request[::-1]

    async def bidi(self, requests, context):
        try:
            async for r in requests:
                if r == b"hang":
                    await asyncio.Event().wait()  # until the call is cancelled
                yield r + b"!"
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def big(self, request: bytes, context) -> bytes:
        return bytes(len(request) * 2)

    def handlers(self):
        return {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Big": grpc.unary_unary_rpc_method_handler(self.big),
        }


def add_echo(server, echo: Echo) -> None:
    handlers = echo.handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)


class Counter:
    """A servicer whose Count has a callback form: damselfly.rpc serves it with no task, grpcio runs
    the coroutine; both answer each request with how many came so far."""

    def __init__(self) -> None:
        self.form_calls = 0
        self.ended: list[bool] = []  # per call, as its done callbacks saw it: cancelled or not
        self.over = asyncio.Event()

    def _count_form(self, requests, context) -> None:
        self.form_calls += 1
        if ("boom", "1") in tuple(context.invocation_metadata()):
            raise RuntimeError("the form failed")
        seen = [0]

        def on_message(m: bytes) -> None:
            if m == b"fail":
                context.end(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
                return
            seen[0] += 1
            assert context.write_nowait(str(seen[0]).encode())

        def done(ctx) -> None:
            self.ended.append(ctx.cancelled())
            self.over.set()

        context.add_done_callback(done)
        requests.listen(on_message, context.end)

    @callback_form(_count_form)
    async def count(self, requests, context):
        n = 0
        async for m in requests:
            if m == b"fail":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            n += 1
            yield str(n).encode()


async def serve_counter(kind: str) -> tuple[Server | grpc.aio.Server, Counter, int]:
    """A started server (``native``: damselfly.rpc's, or grpcio's) with a Counter, and its port."""
    counter = Counter()
    server: Server | grpc.aio.Server = Server() if kind == "native" else grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Counter", {"Count": grpc.stream_stream_rpc_method_handler(counter.count)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, counter, port
