"""damselfly.rpc's server under grpcio's client: every kind of call, errors, deadlines,
cancellation, flow control, the callback form, stopping, and no garbage cycles."""

import asyncio
import gc
import socket
import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from damselfly.rpc import Connection, RequestStream, Server, ServicerContext
from damselfly.rpc.client import ClientStream
from damselfly.rpc.framing import GOAWAY, NO_ERROR, PREFACE
from damselfly.rpc.server import ServerStream
from tests.rpc.servicers import SERVICE, Echo, add_echo, serve_counter

pytestmark = pytest.mark.timeout(60)


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


async def test_garbage_gets_goaway_and_the_server_lives_on(native):
    channel, _, _, port, _ = native
    loop = asyncio.get_running_loop()
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PREFACE + struct.pack(">BHBBI", 0xFF, 0, 1, 4, 1)):
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
            if kind == GOAWAY:
                codes.append(struct.unpack_from(">I", data, off + 13)[0])
            off += 9 + n
        assert codes and codes[-1] != NO_ERROR
    assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"fine", timeout=5) == b"enif"


async def test_stop_refuses_new_calls_and_ends_running_ones():
    server = Server()
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
    assert Server().add_insecure_port("256.1.1.1:0") == 0
    assert Server().add_insecure_port("127.0.0.1:notaport") == 0


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
    server = Server()
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


async def test_generic_handlers_alone_are_found():
    """A server given only grpc.method_handlers_generic_handler (older generated code) serves it."""
    server = Server()
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
    conn = await Connection.open("127.0.0.1", port)
    kinds = (ServerStream, ServicerContext, RequestStream, ClientStream)
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
