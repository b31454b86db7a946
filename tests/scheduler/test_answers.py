"""The scheduler's answers, assembled from cached encodings, against the same answers built
field by field."""

import pytest
from dragonfly_api import common_pb2, scheduler_pb2

from damselfly.config import load_settings
from damselfly.contracts import Candidate
from damselfly.core.host import Host
from damselfly.core.peer import Peer, PeerState
from damselfly.core.task import PieceRecord
from damselfly.plugin_manager import build_plugins
from damselfly.rpc.wire import fill_peer_proto, length_delimited, varint
from damselfly.scheduler import SchedulerService
from damselfly.scheduler.answers import Answers, Kept
from damselfly.telemetry.metrics import SchedulerMetrics

pytestmark = pytest.mark.timeout(30)


def built(svc: SchedulerService, entry, parents: list[Candidate]) -> scheduler_pb2.AnnouncePeerResponse:
    """The answer as the scheduler built it before: every parent filled in, task and host copied."""
    resp = scheduler_pb2.AnnouncePeerResponse()
    resp.normal_task_response.SetInParent()
    task_pb = svc.answers.task_proto(entry)
    parents_pb = resp.normal_task_response.candidate_parents
    for c in parents:
        fill_peer_proto(parents_pb.add(), c.peer, svc.answers.host_proto(c.host), task_pb)
    return resp


def test_varints_and_fields_parse_as_protobuf_writes_them():
    for n in (0, 1, 127, 128, 300, 16383, 16384, 1 << 35):
        assert common_pb2.Piece.FromString(b"\x18" + varint(n)).offset == n  # offset: field 3, uint64
    payload = "x" * 200
    assert common_pb2.Peer.FromString(length_delimited(1, payload.encode())).id == payload


def test_assembled_answers_equal_built_ones_as_parents_and_hosts_change():
    settings = load_settings(plugins={"autoload": False}, log={"level": "WARNING"})
    svc = SchedulerService(settings, build_plugins(settings), SchedulerMetrics())
    st = svc.state
    for i in range(4):
        st.hosts[f"h{i}"] = Host(id=f"h{i}", ip=f"10.0.0.{i}", hostname=f"n{i}", port=4000, max_tx_bandwidth=10**9)
    entry = st.entry("t" * 64)
    entry.task.url, entry.task.content_length, entry.task.piece_length = "http://o/x", 8 << 20, 4 << 20
    peers = [Peer(id=f"p{i}", task_id=entry.task.id, host_id=f"h{i}", state=PeerState.SUCCEEDED) for i in range(3)]
    for p in peers:
        p.created_at, p.updated_at = 1000.25, 1001.5
        st.peers[p.id] = p
        entry.task.peer_ids.add(p.id)
    child = Peer(id="c", task_id=entry.task.id, host_id="h3")
    st.peers["c"] = child

    def parents() -> list[Candidate]:
        return [Candidate(p, st.hosts[p.host_id]) for p in peers]

    first = svc.scheduling.offer(entry, child, [], parents())
    assert first == built(svc, entry, parents())
    assert [p.id for p in first.normal_task_response.candidate_parents] == ["p0", "p1", "p2"]
    assert first.normal_task_response.candidate_parents[1].host.ip == "10.0.0.1"

    # a parent's state and times change, a host comes back with another address, the task
    # gains a piece: the next answer says so (nothing stale from the kept encodings)
    peers[0].state, peers[0].updated_at, peers[0].priority = PeerState.RUNNING, 2002.75, 3
    st.hosts["h1"] = Host(id="h1", ip="10.9.9.9", hostname="n1", port=4001, max_tx_bandwidth=10**9)
    entry.record_piece(PieceRecord(0, 0, 4 << 20, "crc32:7"))
    second = svc.scheduling.offer(entry, child, [], parents())
    assert second == built(svc, entry, parents())
    got = second.normal_task_response.candidate_parents
    assert got[0].state == "Running" and got[0].priority == 3 and got[0].updated_at.seconds == 2002
    assert got[1].host.ip == "10.9.9.9" and got[1].host.port == 4001
    assert [p.digest for p in got[2].task.pieces] == ["crc32:7"]
    assert got[0].task.peer_count == 3

    # no parent at all is still a normal answer (an empty list)
    empty = svc.scheduling.offer(entry, child, [], [])
    assert empty.WhichOneof("response") == "normal_task_response"
    assert not empty.normal_task_response.candidate_parents


def test_a_kept_value_goes_with_its_object():
    kept: Kept[Host, str] = Kept()
    h = Host(id="h", ip="10.0.0.1", hostname="n", port=4000)
    kept.put(h, "first")
    kept.put(h, "second")
    assert kept.get(h) == "second" and len(kept) == 1
    del h  # the last reference: the kept value goes with it
    assert len(kept) == 0
    assert kept.get(Host(id="h", ip="10.0.0.1", hostname="n", port=4000)) is None


def test_encodings_are_reused_until_what_they_encode_changes():
    answers = Answers()
    p = Peer(id="p", task_id="t", host_id="h", state=PeerState.SUCCEEDED, created_at=1.0, updated_at=2.0)
    first = answers.peer_part(p)
    assert answers.peer_part(p) is first  # a hit: the very bytes kept
    p.updated_at = 3.0
    again = answers.peer_part(p)
    assert again is not first and common_pb2.Peer.FromString(again).updated_at.seconds == 3

    h = Host(id="h", ip="10.0.0.1", hostname="n", port=4000)
    field = answers.host_field(h)
    assert answers.host_field(h) is field and answers.host_proto(h) is answers.host_proto(h)
    announced_again = Host(id="h", ip="10.0.0.1", hostname="n", port=4000)  # a new object: encoded anew
    assert answers.host_field(announced_again) is not field and answers.host_field(announced_again) == field
    h.tx_bandwidth = 5
    assert common_pb2.Peer.FromString(answers.host_field(h)).host.network.tx_bandwidth == 5
