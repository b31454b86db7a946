"""The scheduler's gRPC API, driven as a Dragonfly client would drive it."""

import asyncio

import grpc
import pytest
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core import ids
from damselfly.core.task import PieceRecord
from damselfly.rpc.wire import piece_to_proto
from damselfly.scheduler import start_scheduler

# The scheduler takes a register only under its Download's own task id: the downloads of these
# tests name the one task TASK through their content_for_calculating_task_id, whatever their url.
TASK_KEY = "tests.scheduler: the one task"
TASK = ids.keyed_task_id(TASK_KEY)


@pytest.fixture
async def sched(request):
    server_kind = getattr(request, "param", "native")  # the scheduler's gRPC server
    settings = load_settings(scheduler={"seed_wait": 2, "retry_interval": 0.05, "grpc_server": server_kind})
    server = await start_scheduler(settings)
    channel = grpc.aio.insecure_channel(server.address)
    yield scheduler_pb2_grpc.SchedulerStub(channel), server
    await channel.close()
    await server.stop()


def host(name: str, seed: bool = False) -> common_pb2.Host:
    return common_pb2.Host(
        id=f"127.0.0.1-{name}",
        type=1 if seed else 0,
        hostname=name,
        ip="127.0.0.1",
        port=4000,
        network=common_pb2.Network(max_tx_bandwidth=8_000_000_000, idc="a"),
    )


def req(host_id: str, peer_id: str, task_id: str = TASK, **kw) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(host_id=host_id, task_id=task_id, peer_id=peer_id, **kw)


def download(url: str, **kw) -> common_pb2.Download:
    """A Download of ``url`` whose task id is TASK."""
    return common_pb2.Download(url=url, content_for_calculating_task_id=TASK_KEY, **kw)


def register(download: common_pb2.Download) -> dict:
    return {"register_peer_request": scheduler_pb2.RegisterPeerRequest(download=download)}


async def test_hosts_announce_list_delete(sched):
    stub, _ = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True)))
    hosts = {h.id: h for h in (await stub.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}
    assert set(hosts) == {"127.0.0.1-a", "127.0.0.1-s"}
    assert hosts["127.0.0.1-s"].type == 1 and hosts["127.0.0.1-a"].network.idc == "a"
    await stub.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id="127.0.0.1-a"))
    assert [h.id for h in (await stub.ListHosts(scheduler_pb2.ListHostsRequest())).hosts] == ["127.0.0.1-s"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=common_pb2.Host(id="x")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unannounced_host_cannot_register(sched):
    stub, _ = sched
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-ghost", "p1", **register(download(url="http://o/x"))))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# both servers: damselfly.rpc writes an assembled answer's bytes as they are, grpcio is handed the message
@pytest.mark.parametrize("sched", ["native", "grpcio"], indirect=True)
async def test_back_to_source_peer_then_child_gets_it_as_parent(sched):
    stub, _ = sched
    for name in ("a", "b"):
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
    dl = download(url="http://o/x")
    # no seed anywhere: the first peer is sent to the source
    first = stub.AnnouncePeer()
    await first.write(req("127.0.0.1-a", "pa", **register(dl)))
    resp = await first.read()
    assert resp.WhichOneof("response") == "need_back_to_source_response"
    await first.write(
        req(
            "127.0.0.1-a",
            "pa",
            download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest(),
        )
    )
    piece = piece_to_proto(PieceRecord(0, 0, 4 << 20, "crc32:42"), traffic_type=0)
    await first.write(
        req(
            "127.0.0.1-a",
            "pa",
            download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                piece=piece
            ),
        )
    )
    # the second peer gets the first as its parent, with the source's digests
    second = stub.AnnouncePeer()
    await second.write(req("127.0.0.1-b", "pb", **register(dl)))
    resp = await second.read()
    assert resp.WhichOneof("response") == "normal_task_response"
    (parent,) = resp.normal_task_response.candidate_parents
    assert parent.id == "pa" and parent.host.id == "127.0.0.1-a"
    assert [(p.number, p.digest) for p in parent.task.pieces] == [(0, "crc32:42")]

    stat = await stub.StatPeer(scheduler_pb2.StatPeerRequest(host_id="127.0.0.1-a", task_id=TASK, peer_id="pa"))
    assert stat.state == "BackToSource"
    task = await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id="127.0.0.1-a", task_id=TASK))
    assert task.peer_count == 2 and task.url == "http://o/x"

    await first.write(
        req(
            "127.0.0.1-a",
            "pa",
            download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest(),
        )
    )
    assert await first.read() == grpc.aio.EOF  # the scheduler ends the stream
    stat = await stub.StatPeer(scheduler_pb2.StatPeerRequest(host_id="127.0.0.1-a", task_id=TASK, peer_id="pa"))
    assert stat.state == "Succeeded"

    # a reschedule blocklists the parent it names: nobody is left, so b goes to the source
    await second.write(
        req(
            "127.0.0.1-b",
            "pb",
            reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
                candidate_parents=[parent], description="parent failed"
            ),
        )
    )
    resp = await second.read()
    assert resp.WhichOneof("response") == "need_back_to_source_response"
    second.cancel()

    await stub.DeletePeer(scheduler_pb2.DeletePeerRequest(host_id="127.0.0.1-a", task_id=TASK, peer_id="pa"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StatPeer(scheduler_pb2.StatPeerRequest(host_id="127.0.0.1-a", task_id=TASK, peer_id="pa"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteTask(scheduler_pb2.DeleteTaskRequest(host_id="127.0.0.1-b", task_id=TASK))
    task = await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id="127.0.0.1-a", task_id=TASK))
    assert task.peer_count == 0


async def test_empty_task_and_unknown_task(sched):
    stub, _ = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    dl = download(url="http://o/empty", actual_content_length=0, actual_piece_length=4 << 20)
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "pe", **register(dl)))
    assert (await call.read()).WhichOneof("response") == "empty_task_response"
    call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id="cd" * 32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_broken_stream_makes_the_peer_leave(sched):
    stub, server = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "px", **register(download(url="http://o/y"))))
    await call.read()
    assert "px" in server.service.state.peers
    call.cancel()

    async def gone() -> None:
        while "px" in server.service.state.peers:
            await server.service.state.tasks[TASK].changed.wait()

    await asyncio.wait_for(gone(), 10)


async def test_gc_forgets_silent_hosts_old_peers_and_empty_tasks(sched):
    stub, server = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("b")))
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-b", "pb", **register(download(url="http://o/z"))))
    await call.read()
    call.cancel()
    st = server.service.state
    st.hosts["127.0.0.1-a"].announced_at -= 3 * st.hosts["127.0.0.1-a"].interval
    now = __import__("time").time()
    server.service.state.collect(now)
    assert set(st.hosts) == {"127.0.0.1-b"}
    server.service.state.collect(now + 2 * 86400)  # past the peer TTL and the task grace
    assert not st.peers and not st.tasks


async def test_a_downloading_peer_is_offered_new_parents_as_they_appear(sched):
    from damselfly.core.host import Host
    from damselfly.core.peer import Peer, PeerState

    _, server = sched
    svc = server.service
    st = svc.state
    entry = st.entry(TASK)
    for name in ("a", "b", "x"):
        st.hosts[name] = Host(id=name, ip="127.0.0.1", hostname=name, port=1, max_tx_bandwidth=8 << 30)
    a = Peer(id="pa", task_id=TASK, host_id="a", state=PeerState.BACK_TO_SOURCE)
    b = Peer(id="pb", task_id=TASK, host_id="b", state=PeerState.RUNNING, parents={"pa"})
    for p in (a, b):
        st.peers[p.id] = p
        entry.task.peer_ids.add(p.id)
    out: asyncio.Queue = asyncio.Queue()
    svc.scheduling.start_refresh(entry, b, out)
    # a new peer downloading from a, not from b, appears
    x = Peer(id="px", task_id=TASK, host_id="x", state=PeerState.RUNNING, parents={"pa"})
    st.peers[x.id] = x
    entry.task.peer_ids.add(x.id)
    entry.notify()
    resp = await asyncio.wait_for(out.get(), 5)
    assert sorted(c.id for c in resp.normal_task_response.candidate_parents) == ["pa", "px"]
    assert b.parents == {"pa", "px"} and "pb" in x.children
    # the limit (3) is not reached, but nobody else fits: no more offers; finishing ends them
    assert svc.scheduling.refresh_peer(entry, b, out) is True and out.empty()
    b.state = PeerState.SUCCEEDED
    svc.scheduling.refresh_task(entry)
    assert "pb" not in entry.refreshers and out.empty()


async def test_a_refresher_looks_again_within_the_refresh_interval_without_a_change(sched):
    """A parent that became usable without a change its task was told of is still offered."""
    from damselfly.core.host import Host
    from damselfly.core.peer import Peer, PeerState
    from damselfly.scheduler.scheduling import REFRESH_INTERVAL

    _, server = sched
    svc = server.service
    st = svc.state
    entry = st.entry(TASK)
    for name in ("a", "b"):
        st.hosts[name] = Host(id=name, ip="127.0.0.1", hostname=name, port=1, max_tx_bandwidth=8 << 30)
    b = Peer(id="pb", task_id=TASK, host_id="b", state=PeerState.RUNNING)
    st.peers[b.id] = b
    entry.task.peer_ids.add(b.id)
    out: asyncio.Queue = asyncio.Queue()
    svc.scheduling.start_refresh(entry, b, out)
    a = Peer(id="pa", task_id=TASK, host_id="a", state=PeerState.BACK_TO_SOURCE)
    st.peers[a.id] = a
    entry.task.peer_ids.add(a.id)  # and no notify()
    resp = await asyncio.wait_for(out.get(), REFRESH_INTERVAL * 3)
    assert [c.id for c in resp.normal_task_response.candidate_parents] == ["pa"]
    assert b.parents == {"pa"}


async def test_in_a_mesh_a_peer_at_its_parent_limit_is_offered_back_its_children():
    """swarm's mesh: a peer that others fetch from gets them as parents too, past the limit."""
    from damselfly.core.host import Host
    from damselfly.core.peer import Peer, PeerState

    settings = load_settings(scheduler={"strategy": "swarm", "seed_wait": 2, "retry_interval": 0.05})
    server = await start_scheduler(settings)
    try:
        svc = server.service
        st = svc.state
        limit = st.parent_limit
        entry = st.entry(TASK)
        names = [f"h{i}" for i in range(limit + 2)]
        for name in names:
            st.hosts[name] = Host(id=name, ip="127.0.0.1", hostname=name, port=1, max_tx_bandwidth=8 << 30)
        peers = [Peer(id=f"p{n}", task_id=TASK, host_id=n, state=PeerState.RUNNING) for n in names]
        for p in peers:
            st.peers[p.id] = p
            entry.task.peer_ids.add(p.id)
        late, others = peers[-1], peers[:-1]
        late.parents = {p.id for p in others[:limit]}  # it registered last: its parents are full
        for p in others[:limit]:
            p.children.add(late.id)
        child = others[0]
        child.parents = {p.id for p in others[1 : limit + 1]}  # nobody had taken the late peer on
        out: asyncio.Queue = asyncio.Queue()
        svc.scheduling.start_refresh(entry, child, out)
        entry.notify()
        resp = await asyncio.wait_for(out.get(), 5)
        offered = [c.id for c in resp.normal_task_response.candidate_parents]
        assert late.id in offered and len(offered) == limit + 1
        assert late.id in child.parents and child.id in late.children
        child.state = PeerState.SUCCEEDED
        svc.scheduling.refresh_task(entry)
        assert child.id not in entry.refreshers
    finally:
        await server.stop()
