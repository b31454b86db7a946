"""Super-seeding and upload slots: which child hears of which piece, and what a busy parent answers."""

import asyncio

import grpc
import pytest
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

from damselfly.core import vortex
from damselfly.core.errors import Busy, Declined, NotFound
from damselfly.daemon.superseed import SuperSeeder
from damselfly.kit import PieceResponse, error_frame


def test_each_new_piece_is_offered_to_one_child_the_least_loaded_first():
    s = SuperSeeder(4)
    s.join("a", [])
    s.join("b", [])
    assert s.sync({0}, now=0.0) == ["a"]  # equal load: the first to join
    assert s.visible("a", {0}) == {0} and s.visible("b", {0}) == set()
    assert s.sync({0, 1}, now=0.1) == ["b"]  # a holds an offer: b gets the next
    s.taken(0)
    s.done(0)  # a's piece went out and was sent: a has room again
    assert s.sync({0, 1, 2}, now=0.2) == ["a"]
    assert s.visible("a", {0, 1, 2}) == {2}  # a piece sent before is not shown again
    assert s.sync({0, 1, 2}, now=0.3) == []  # nothing new, no offer is stale


def test_a_child_holds_at_most_per_child_offers_and_the_rest_wait():
    s = SuperSeeder(6, per_child=2)
    s.join("a", [])
    assert s.sync({0, 1, 2}, now=0.0) == ["a", "a"]  # 2 may be outstanding; piece 2 waits
    assert s.visible("a", {0, 1, 2}) == {0, 1}
    s.taken(0)  # being sent still counts against a
    assert s.sync({0, 1, 2}, now=0.1) == []
    s.done(0)
    assert s.sync({0, 1, 2}, now=0.2) == ["a"]
    assert s.visible("a", {0, 1, 2}) == {1, 2}


def test_an_offer_not_taken_in_time_goes_to_one_more_child_and_a_leaver_s_to_another():
    s = SuperSeeder(3, offer_timeout=1.0)
    s.join("a", [])
    s.join("b", [])
    s.join("c", [])
    assert s.sync({0}, now=0.0) == ["a"]
    assert s.next_deadline() == 1.0
    assert s.sync({0}, now=0.5) == []
    assert s.sync({0}, now=1.0) == ["b"]  # a sat on it: b is told too
    assert s.visible("a", {0}) == {0} and s.visible("b", {0}) == {0}
    s.taken(0)  # fetched: settled; its load stays with the first offered (a) until sent
    assert s.visible("b", {0}) == set()
    assert s.sync({0, 1}, now=1.1) == ["c"]  # a has no room; c has had fewer offers than b
    s.leave("c")
    assert s.sync({0, 1}, now=1.2) == ["b"]  # c went away without it: offered again at once


def test_only_children_that_want_a_piece_are_offered_it():
    s = SuperSeeder(4)
    s.join("ranged", [2, 3])
    s.join("whole", [])
    s.taken(0)
    assert s.sync({1}, now=0.0) == ["whole"]
    assert s.sync({1, 2}, now=0.0) == ["ranged"]


def test_once_every_piece_went_out_every_child_sees_everything():
    s = SuperSeeder(2)
    s.join("a", [])
    s.join("b", [])
    s.sync({0, 1}, now=0.0)
    s.taken(0)
    assert not s.open({0, 1})
    s.taken(1)
    assert s.open({0, 1}) and not s.open({0})
    assert s.visible("a", {0, 1}) == {0, 1} and s.visible("b", {0, 1}) == {0, 1}
    assert s.visible("late", {0, 1}) == {0, 1}  # a child that joins after that too
    assert s.sync({0, 1}, now=5.0) == []


@pytest.mark.parametrize(
    ("exc", "code", "raised"),
    [
        (Busy("all 2 upload slots are taken"), vortex.ErrorCode.UNAVAILABLE, Busy),
        (Declined("piece 3 went out already"), vortex.ErrorCode.DECLINED, Declined),
        (NotFound("no piece 3"), vortex.ErrorCode.NOT_FOUND, NotFound),
    ],
)
def test_busy_and_declined_cross_the_wire_as_their_own_codes(exc, code, raised):
    frame = error_frame(exc, packet_id=7)
    decoder = vortex.Decoder()
    decoder.receive_data(frame)
    event = decoder.next_event()
    assert isinstance(event, vortex.Error) and event.code == code
    with pytest.raises(raised) as got:
        PieceResponse(3).feed(frame)
    assert type(got.value) is raised  # Busy and Declined are NotFounds (the connection stays), told apart


async def _upload_server(d):
    """The daemon's DfdaemonUpload service on a port of its own, and a channel to it."""
    from damselfly.daemon.upload import UploadService

    server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(UploadService(d.upload_context), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def _stored_daemon(tmp_path, pieces: int, **daemon):
    from damselfly.config import Settings
    from damselfly.core.piece import PieceSpan, digest
    from damselfly.core.task import Task
    from damselfly.daemon.daemon import Daemon

    settings = Settings(daemon={"data_dir": tmp_path, **daemon})
    d = Daemon(settings)
    await d.storage.open()
    data = b"x" * 1024
    task = await d.storage.create(
        Task(id="a" * 64, url="http://origin.example/f.bin", content_length=1024 * pieces, piece_length=1024)
    )
    for n in range(pieces):
        w = d.storage.writer(task.id, PieceSpan(n, n * 1024, 1024))
        w.write(data)
        await w.commit(digest(data))
    return d, task


@pytest.mark.timeout(60)
async def test_upload_slots_answer_busy_and_free_up_when_the_piece_is_sent(tmp_path):
    from damselfly.daemon.upload import lookup_piece

    d, task = await _stored_daemon(tmp_path, 2, upload_slots=1, seed=True, super_seed=True)
    try:
        first = await lookup_piece(d.upload_context, task.id, 0)
        with pytest.raises(Busy):
            await lookup_piece(d.upload_context, task.id, 1)  # the one slot is taken
        assert first.release is not None
        first.release()
        first.release()  # twice is harmless
        second = await lookup_piece(d.upload_context, task.id, 1)  # a super-seeding seed refuses nobody
        second.release()
        seeder = d.offers.seeder(task)
        assert seeder is not None and seeder.sent == {0, 1} and seeder.open(task.pieces.keys())
        assert d.uploading == 0
    finally:
        await d.storage.close()
        await asyncio.sleep(0)


@pytest.mark.timeout(60)
async def test_a_super_seeding_seed_tells_each_child_of_different_pieces(tmp_path):
    """Over real SyncPieces streams: two children hear of disjoint pieces until all went out."""
    from damselfly.daemon.upload import lookup_piece

    d, task = await _stored_daemon(tmp_path, 4, seed=True, super_seed=True, offers_per_child=2)
    server, channel = await _upload_server(d)
    try:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        heard: dict[str, list[int]] = {"a": [], "b": []}
        four = asyncio.Event()
        calls = {name: stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id=name, task_id=task.id)) for name in heard}

        async def follow(name: str) -> None:
            async for resp in calls[name]:
                heard[name].append(resp.number)
                if len(heard["a"]) + len(heard["b"]) >= 4:
                    four.set()

        followers = [asyncio.ensure_future(follow(n)) for n in heard]
        await asyncio.wait_for(four.wait(), 10)  # 2 offers each
        assert not set(heard["a"]) & set(heard["b"])
        assert sorted(heard["a"] + heard["b"]) == [0, 1, 2, 3]
        for n in range(4):  # each child fetches what it was told of: now everyone sees everything
            served = await lookup_piece(d.upload_context, task.id, n)
            assert served.release is not None
            served.release()
        await asyncio.wait_for(asyncio.gather(*followers), 10)
        assert sorted(heard["a"]) == sorted(heard["b"]) == [0, 1, 2, 3]
    finally:
        await channel.close()
        await server.stop(None)
        await d.storage.close()


async def test_a_request_may_wait_for_an_upload_slot_and_is_handed_the_next_one():
    from damselfly.daemon.upload import UploadSlots

    slots = UploadSlots()
    assert await slots.acquire(1, 0.0)
    assert not await slots.acquire(1, 0.0)  # full, no wait: busy at once
    assert not await slots.acquire(1, 0.05)  # full for longer than the wait
    waiter = asyncio.ensure_future(slots.acquire(1, 5.0))
    await asyncio.sleep(0)
    slots.release()  # handed straight to the waiter: still one in use
    assert await waiter and slots.used == 1
    cancelled = asyncio.ensure_future(slots.acquire(1, 5.0))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    slots.release()  # nobody waits any more: the slot is free
    assert slots.used == 0
    assert await slots.acquire(0, 0.0) and await slots.acquire(0, 0.0)  # 0: no limit


@pytest.mark.timeout(60)
async def test_sync_pieces_skips_the_pieces_the_child_s_host_told_us_it_holds(tmp_path):
    """In a mesh a child is often our parent too: what it announced to us, it is not told back."""
    from damselfly.daemon.runtime import TaskRuntime

    d, task = await _stored_daemon(tmp_path, 4)
    rt = TaskRuntime(task.id)
    d.board.add(rt)  # our own download of the task, whose parent on host-b announced 1 and 2
    rt.held["host-b"] = {1, 2}
    server, channel = await _upload_server(d)
    try:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)

        async def heard(host_id: str) -> list[int]:
            call = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id=host_id, task_id=task.id))
            return [resp.number async for resp in call]

        b, c = await asyncio.wait_for(asyncio.gather(heard("host-b"), heard("host-c")), 10)
        assert b == [0, 3]  # the stream still ends: b holds the rest
        assert c == [0, 1, 2, 3]
        assert d.board.held_by(task.id, "host-b") == {1, 2} and d.board.held_by(task.id, "host-c") == set()
        skipped = d.metrics.sync_pieces.labels("skipped")._value.get()
        announced = d.metrics.sync_pieces.labels("announced")._value.get()
        assert (skipped, announced) == (2, 6)
    finally:
        await channel.close()
        await server.stop(None)
        await d.storage.close()
