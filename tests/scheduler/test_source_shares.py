"""A shared source read: the scheduler splits a new task between its seed and the peers waiting."""

import asyncio

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core.task import PieceRecord
from damselfly.rpc.wire import SOURCE_SHARES_METADATA, download_task_id, piece_to_proto, source_share_from_proto
from damselfly.scheduler import start_scheduler
from tests.helpers.waiting import wait_for
from tests.scheduler.test_service import TASK, download, host, register, req

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
# a task named by its url, as the seed a scheduler triggers takes it (a task key a request
# chooses is no seed's to fill)
SHARED = common_pb2.Download(url="http://o/shared")
SHARED_TASK = download_task_id(SHARED)


def shared_req(host_id: str, peer_id: str, **kw) -> scheduler_pb2.AnnouncePeerRequest:
    return req(host_id, peer_id, SHARED_TASK, **kw)


class _Seed(dfdaemon_pb2_grpc.DfdaemonUploadServicer):
    """The seed's upload service: takes the scheduler's trigger and holds it open (the test
    plays the seed's announce stream itself)."""

    def __init__(self) -> None:
        self.triggered = asyncio.Event()

    async def DownloadTask(self, request, context):
        self.triggered.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover


@pytest.fixture
async def cluster(request):
    more = getattr(request, "param", {})  # more scheduler settings
    seed = _Seed()
    seed_server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(seed, seed_server)
    seed_port = seed_server.add_insecure_port("127.0.0.1:0")
    await seed_server.start()
    server = await start_scheduler(
        load_settings(
            scheduler={"seed_wait": 30, "retry_interval": 0.05, "source_shares": True, "strategy": "swarm", **more}
        )
    )
    channel = grpc.aio.insecure_channel(server.address)
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    for name in ("a", "b", "c"):
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
    seed_host = host("s", seed=True)
    seed_host.port = seed_port
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=seed_host))
    yield stub, server, seed
    await channel.close()
    await server.stop()
    await seed_server.stop(0)


def shares_of(resp: scheduler_pb2.AnnouncePeerResponse) -> tuple[list[int], list[str]]:
    """The pieces handed over to read from the source, and the ordinary parents."""
    assert resp.WhichOneof("response") == "normal_task_response", resp
    pieces, parents = [], []
    for c in resp.normal_task_response.candidate_parents:
        share = source_share_from_proto(c)
        if share is None:
            parents.append(c.id)
        else:
            assert c.need_back_to_source and c.task.content_length == 10 * MiB + 1
            pieces += share
    return pieces, parents


async def test_the_seed_and_the_waiting_peers_each_read_a_block_and_a_leaver_hands_its_block_on(cluster):
    stub, server, seed = cluster
    dl = SHARED
    calls = {}
    for name in ("a", "b"):  # damselfly daemons: they offer to take a share
        calls[name] = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
        await calls[name].write(shared_req(f"127.0.0.1-{name}", f"p{name}", **register(dl)))
    calls["c"] = stub.AnnouncePeer()  # a client that does not (an upstream dfdaemon) gets no share
    await calls["c"].write(shared_req("127.0.0.1-c", "pc", **register(dl)))
    await asyncio.wait_for(seed.triggered.wait(), 10)

    # the seed stats the origin (11 pieces of 1 MiB) and registers to read it all
    seed_call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    seed_dl = common_pb2.Download(
        url=SHARED.url, need_back_to_source=True, actual_content_length=10 * MiB + 1, actual_piece_length=MiB
    )
    await seed_call.write(shared_req("127.0.0.1-s", "ps-seed", **register(seed_dl)))
    assert shares_of(await seed_call.read()) == ([0, 1, 2], [])  # its block, first; no parent yet
    await seed_call.write(
        shared_req("127.0.0.1-s", "ps-seed", download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())
    )
    # the waiting peers hear of their blocks with the seed as a parent; c of the seed alone
    assert shares_of(await calls["a"].read()) == ([3, 4, 5, 6], ["ps-seed"])
    assert shares_of(await calls["b"].read()) == ([7, 8, 9, 10], ["ps-seed"])
    assert shares_of(await calls["c"].read()) == ([], ["ps-seed"])
    metrics = server.service.metrics
    assert metrics.source_share_pieces.labels("planned")._value.get() == 11

    # b reads piece 7, then its stream breaks: the rest of its block goes to the seed, and so
    # does piece 7, which nobody else holds (children waiting for it would wait for nothing)
    piece = piece_to_proto(PieceRecord(7, 7 * MiB, MiB, "crc32:7"), traffic_type=0)
    await calls["b"].write(
        shared_req(
            "127.0.0.1-b",
            "pb",
            download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                piece=piece
            ),
        )
    )
    entry = server.service.state.tasks[SHARED_TASK]

    await wait_for(lambda: 7 not in entry.shares.get("pb", set()), 10, "piece 7 reported")
    calls["b"].cancel()
    handed = await seed_call.read()
    while shares_of(handed)[0] == []:  # a refresh may come first
        handed = await seed_call.read()
    assert shares_of(handed)[0] == [7, 8, 9, 10]
    assert metrics.source_share_pieces.labels("handed_on")._value.get() == 4
    assert entry.shares["ps-seed"] == {0, 1, 2, 7, 8, 9, 10}

    # a reports it cannot read the source: its block goes to the seed too
    await calls["a"].write(
        shared_req(
            "127.0.0.1-a",
            "pa",
            download_piece_back_to_source_failed_request=scheduler_pb2.DownloadPieceBackToSourceFailedRequest(
                piece_number=3
            ),
        )
    )
    handed = await seed_call.read()
    while shares_of(handed)[0] == []:
        handed = await seed_call.read()
    assert shares_of(handed)[0] == [3, 4, 5, 6]
    assert "pa" not in entry.shares and "pa" not in entry.sharers  # not handed anything again
    for call in (calls["a"], calls["c"], seed_call):
        call.cancel()


async def test_a_seed_with_nobody_waiting_reads_the_whole_task(cluster):
    stub, server, _ = cluster
    seed_call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    seed_dl = download(
        url="http://o/alone", need_back_to_source=True, actual_content_length=4 * MiB, actual_piece_length=MiB
    )
    await seed_call.write(req("127.0.0.1-s", "ps-seed", **register(seed_dl)))
    resp = await seed_call.read()
    assert resp.WhichOneof("response") == "need_back_to_source_response"
    assert not server.service.state.tasks[TASK].shares
    seed_call.cancel()


async def test_pieces_a_peer_already_holds_are_left_out_of_the_shares(cluster):
    """A task the scheduler meets again (after a restart): a peer announces it holds pieces
    0-5; the seed and the waiting peer share only 6-10, and no piece is read twice."""
    stub, server, seed = cluster
    holder = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    await holder.write(shared_req("127.0.0.1-c", "pc", **register(SHARED)))
    waiting = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    await waiting.write(shared_req("127.0.0.1-a", "pa", **register(SHARED)))
    await asyncio.wait_for(seed.triggered.wait(), 10)
    entry = server.service.state.tasks[SHARED_TASK]
    server.service.state.peers["pc"].finished_pieces.update(range(6))  # as its announcement said
    seed_call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    seed_dl = common_pb2.Download(
        url=SHARED.url, need_back_to_source=True, actual_content_length=10 * MiB + 1, actual_piece_length=MiB
    )
    await seed_call.write(shared_req("127.0.0.1-s", "ps-seed", **register(seed_dl)))
    first = shares_of(await seed_call.read())[0]
    planned = sorted(n for share in entry.shares.values() for n in share)
    assert planned == [6, 7, 8, 9, 10] and first and set(first) <= set(planned)
    for call in (holder, waiting, seed_call):
        call.cancel()


@pytest.mark.parametrize("cluster", [{"source_share_readers": 2}], indirect=True)
async def test_source_share_readers_caps_who_reads_a_block(cluster):
    """With scheduler.source_share_readers 2, the seed and the first waiting peer read the task
    (a slow origin split 17 ways gives no whole piece for seconds); the other peer fetches."""
    stub, server, seed = cluster
    calls = {}
    for name in ("a", "b"):
        calls[name] = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
        await calls[name].write(shared_req(f"127.0.0.1-{name}", f"p{name}", **register(SHARED)))
    await asyncio.wait_for(seed.triggered.wait(), 10)
    seed_call = stub.AnnouncePeer(metadata=SOURCE_SHARES_METADATA)
    seed_dl = common_pb2.Download(
        url=SHARED.url, need_back_to_source=True, actual_content_length=10 * MiB + 1, actual_piece_length=MiB
    )
    await seed_call.write(shared_req("127.0.0.1-s", "ps-seed", **register(seed_dl)))
    assert shares_of(await seed_call.read()) == ([0, 1, 2, 3, 4], [])
    entry = server.service.state.tasks[SHARED_TASK]
    assert entry.shares == {"ps-seed": {0, 1, 2, 3, 4}, "pa": {5, 6, 7, 8, 9, 10}}  # b reads nothing
    for call in (*calls.values(), seed_call):
        call.cancel()
