"""damselfly.rpc.h2grpc against grpcio: its server under grpcio's client, its client against grpcio's server."""

import asyncio
import gc
import socket
import struct

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from damselfly.rpc import h2grpc

pytestmark = pytest.mark.timeout(60)

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


@pytest.fixture
async def native():
    echo = Echo()
    server = h2grpc.Server()
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


async def test_unary_metadata_and_errors_through_grpcio(native):
    channel, echo, _, _, _ = native
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    assert await unary(b"abc", metadata=(("x-key", "v1"), ("x-blob-bin", b"\x00\xff")), timeout=5) == b"cba"
    md = dict(echo.metadata)
    assert md["x-key"] == "v1"
    assert md["x-blob-bin"] == b"\x00\xff"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(b"abort", timeout=5)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "no: ünïcode % 100"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(b"raise", timeout=5)
    assert err.value.code() is grpc.StatusCode.UNKNOWN
    assert "boom" in err.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/test.Echo/Missing")(b"", timeout=5)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_deadline_and_cancel(native):
    channel, echo, _, _, _ = native
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(f"/{SERVICE}/Unary")(b"sleep", timeout=0.3)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    call = channel.stream_stream(f"/{SERVICE}/Bidi")()
    await call.write(b"one")
    assert await call.read() == b"one!"
    await call.write(b"hang")
    call.cancel()
    await asyncio.wait_for(echo.cancelled.wait(), 10)  # the handler saw the client go
    # the server is still fine for the next call
    assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"ok", timeout=5) == b"ko"


async def test_many_messages_and_flow_control(native):
    channel, _, _, _, _ = native
    call = channel.stream_stream(f"/{SERVICE}/Bidi")()
    for i in range(500):
        await call.write(b"m%d" % i)
    await call.done_writing()
    got = [m async for m in call]
    assert got == [b"m%d!" % i for i in range(500)]
    assert await call.code() is grpc.StatusCode.OK
    # 3 MiB up and 6 MiB down: far beyond HTTP/2's 64 KiB default windows
    reply = await channel.unary_unary(f"/{SERVICE}/Big")(b"\x01" * (3 << 20), timeout=20)
    assert reply == bytes(6 << 20)


async def test_health_watch_uses_context_write(native):
    channel, _, _, _, hs = native
    stub = health_pb2_grpc.HealthStub(channel)
    assert (
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    ).status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    await hs.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


async def test_native_client_against_both_servers(native):
    _, _, _, port, _ = native
    grpcio_server = grpc.aio.server()
    add_echo(grpcio_server, Echo())
    gport = grpcio_server.add_insecure_port("127.0.0.1:0")
    await grpcio_server.start()
    try:
        for p in (port, gport):
            conn = await h2grpc.Connection.open("127.0.0.1", p)
            try:
                for _ in range(3):  # the header table warms up: later calls send indices only
                    assert await conn.unary(f"/{SERVICE}/Unary", b"xyz", timeout=5) == b"zyx"
                with pytest.raises(h2grpc.RpcError) as err:
                    await conn.unary(f"/{SERVICE}/Unary", b"abort", timeout=5)
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                assert err.value.details == "no: ünïcode % 100"
                st = conn.stream(f"/{SERVICE}/Bidi")
                for i in range(100):
                    st.send(b"%d" % i)
                st.end()
                got = [m async for m in h2grpc.aiter_messages(st)]
                assert got == [b"%d!" % i for i in range(100)]
                reply = await conn.unary(f"/{SERVICE}/Big", b"\x02" * (1 << 20), timeout=20)
                assert reply == bytes(2 << 20)
            finally:
                conn.close()
    finally:
        await grpcio_server.stop(0)


async def test_garbage_gets_goaway_and_the_server_lives_on(native):
    channel, _, _, port, _ = native
    loop = asyncio.get_running_loop()
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2grpc.PREFACE + struct.pack(">BHBBI", 0xFF, 0, 1, 4, 1)):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(junk)
        data = b""
        while True:
            chunk = await loop.run_in_executor(None, s.recv, 65536)
            if not chunk:
                break
            data += chunk
        s.close()
        # somewhere in what came back: a GOAWAY frame (type 7) with a non-zero error code
        off, codes = 0, []
        while off + 9 <= len(data):
            hi, lo, kind, _, _ = struct.unpack_from(">BHBBI", data, off)
            n = hi << 16 | lo
            if kind == h2grpc.GOAWAY:
                codes.append(struct.unpack_from(">I", data, off + 13)[0])
            off += 9 + n
        assert codes and codes[-1] != h2grpc.NO_ERROR
    assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"fine", timeout=5) == b"enif"


async def test_stop_refuses_new_calls_and_ends_running_ones():
    server = h2grpc.Server()
    echo = Echo()
    add_echo(server, echo)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        pending = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Unary")(b"sleep", timeout=20))
        await asyncio.wait_for(echo.sleeping.wait(), 10)
        await server.stop(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pending
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert await server.wait_for_termination(1)


def test_bad_address_returns_zero():
    assert h2grpc.Server().add_insecure_port("256.1.1.1:0") == 0
    assert h2grpc.Server().add_insecure_port("127.0.0.1:notaport") == 0


def test_timeouts_parse():
    assert h2grpc.parse_timeout(b"250m") == 0.25
    assert h2grpc.parse_timeout(b"2S") == 2.0
    assert h2grpc.parse_timeout(b"1H") == 3600.0
    assert h2grpc.parse_timeout(b"x") is None
    assert h2grpc.parse_timeout(b"123456789m") is None  # over 8 digits


class Listener:
    """A stream handler that takes its requests through listen(), as the scheduler's AnnouncePeer does."""

    def __init__(self) -> None:
        self.seen: list = []

    async def chat(self, requests, context):
        out: asyncio.Queue = asyncio.Queue()
        requests.listen(lambda m: (self.seen.append(m), out.put_nowait(m)), lambda: out.put_nowait(None))
        while await out.get() is not None:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_listen_hands_requests_over_and_refuses_a_bad_one():
    listener = Listener()
    server = h2grpc.Server()
    handler = grpc.stream_stream_rpc_method_handler(
        listener.chat,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_registered_method_handlers("test.Listen", {"Chat": handler})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            chat = channel.stream_stream("/test.Listen/Chat")  # raw bytes: we choose what is sent
            call = chat()
            await call.write(health_pb2.HealthCheckRequest(service="a").SerializeToString())
            await call.write(health_pb2.HealthCheckRequest(service="b").SerializeToString())
            await call.done_writing()
            assert len([m async for m in call]) == 2
            assert await call.code() is grpc.StatusCode.OK
            assert [m.service for m in listener.seen] == ["a", "b"]

            call = chat()
            await call.write(b"\xff\xff\xff")  # not a HealthCheckRequest
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() is grpc.StatusCode.INTERNAL
            assert "cannot parse" in err.value.details()
    finally:
        await server.stop(0.5)


async def test_output_waits_for_window_even_when_a_window_went_negative():
    """A peer may shrink SETTINGS_INITIAL_WINDOW_SIZE below what is in flight (RFC 9113 6.9.2)."""

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, d: bytes) -> None:
            self.data += d

    conn = h2grpc._H2Protocol()
    conn.transport = Sink()
    st = h2grpc._Stream(1, -10)
    conn.streams[1] = st
    conn._send_data(st, b"x" * 100)
    conn._flush()
    assert conn.transport.data == b""  # nothing may go out
    assert bytes(st.pending) == b"x" * 100
    st.window += 60  # the peer grants 60: 50 bytes may go now
    conn._drain_blocked()
    conn._flush()
    assert conn.transport.data.endswith(b"x" * 50) and len(conn.transport.data) == 9 + 50
    assert len(st.pending) == 50


async def test_generic_handlers_alone_are_found():
    """A server given only grpc.method_handlers_generic_handler (older generated code) serves it."""
    server = h2grpc.Server()
    echo = Echo()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, echo.handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"gen", timeout=5) == b"neg"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0.5)


async def test_client_calls_past_a_goaway_fail_as_unavailable():
    class Sink:
        def write(self, d: bytes) -> None:
            pass

    conn = h2grpc.Connection("x:1")
    conn.transport = Sink()
    st = conn.stream(f"/{SERVICE}/Unary")
    # the server went away having processed no stream of ours (last stream id 0)
    goaway = h2grpc.frame(h2grpc.GOAWAY, 0, 0, struct.pack(">II", 0, h2grpc.NO_ERROR))
    conn.data_received(goaway)
    with pytest.raises(h2grpc.RpcError) as err:
        await st.recv()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert err.value.details == "the server went away"


class Counter:
    """A servicer whose Count has a callback form: h2grpc serves it with no task, grpcio runs
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

    @h2grpc.callback_form(_count_form)
    async def count(self, requests, context):
        n = 0
        async for m in requests:
            if m == b"fail":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            n += 1
            yield str(n).encode()


async def serve_counter(kind: str):
    counter = Counter()
    server = h2grpc.Server() if kind == "native" else grpc.aio.server()
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


@pytest.mark.parametrize("kind", ["native", "grpcio"])
async def test_a_callback_form_answers_as_its_coroutine_does(kind):
    server, counter, port = await serve_counter(kind)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/test.Counter/Count")()
            for m in (b"a", b"b", b"c"):
                await call.write(m)
            assert await call.read() == b"1"
            if kind == "native":
                assert counter.form_calls == 1 and not server._tasks  # served with no task
            await call.done_writing()
            assert [await call.read(), await call.read(), await call.read()] == [b"2", b"3", grpc.aio.EOF]
            assert await call.code() is grpc.StatusCode.OK

            call = channel.stream_stream("/test.Counter/Count")()
            await call.write(b"x")
            await call.write(b"fail")
            assert await call.read() == b"1"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "asked to fail"
        if kind == "native":
            assert counter.ended == [False, False]
        else:
            assert counter.form_calls == 0
    finally:
        await server.stop(0.5)


async def test_a_callback_form_hears_of_a_cancel_a_failure_and_the_server_stopping():
    server, counter, port = await serve_counter("native")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            count = channel.stream_stream("/test.Counter/Count")
            call = count()
            await call.write(b"a")
            assert await call.read() == b"1"
            call.cancel()
            await asyncio.wait_for(counter.over.wait(), 10)
            assert counter.ended == [True] and not server._callback_streams

            call = count(metadata=(("boom", "1"),))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.UNKNOWN and "the form failed" in err.value.details()

            counter.over.clear()
            call = count()
            await call.write(b"a")
            assert await call.read() == b"1"
            await server.stop(0.2)  # the call never ends by itself: stop cancels it
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert counter.over.is_set() and not server._callback_streams
            assert await server.wait_for_termination(1)
    finally:
        await server.stop(0)


def _live(*types: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) in types)


async def test_calls_that_are_over_leave_no_cycles_for_the_collector():
    """With the cyclic collector off, a finished call's stream, context, requests and the
    handler's callbacks are freed all the same (by reference counting): a busy server then
    gets no collector pauses from the calls it served."""
    server, counter, port = await serve_counter("native")
    conn = await h2grpc.Connection.open("127.0.0.1", port)
    kinds = (h2grpc._ServerStream, h2grpc.ServicerContext, h2grpc._Requests, h2grpc.ClientStream)
    gc.collect()
    gc.disable()
    try:
        before = _live(*kinds)
        ended = []
        for _ in range(20):
            st = conn.stream("/test.Counter/Count")
            st.send(b"a")
            assert await asyncio.wait_for(st.recv(), 5) == b"1"
            st.send(b"b")
            over = asyncio.get_running_loop().create_future()
            # the stream's end heard by a callback, as a client with no task per call hears it
            st.messages.listen(lambda m: None, lambda s=st, f=over: f.set_result(s.status))
            st.end()
            ended.append(await asyncio.wait_for(over, 5))
            del st, over
        assert ended == [0] * 20 and counter.form_calls == 20
        assert not server._callback_streams  # each call's done callbacks ran before its trailers went
        assert _live(*kinds) == before
    finally:
        gc.enable()
        conn.close()
        await server.stop(0.5)
