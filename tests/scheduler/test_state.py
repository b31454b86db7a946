"""The scheduler's state as plain logic: what a peer registered for, and the pieces a task's
source readers report."""

import pytest

from damselfly.config import Settings
from damselfly.core.host import Host
from damselfly.core.peer import Peer, PeerState
from damselfly.core.task import PieceRecord, Task
from damselfly.plugins.scheduler.dragonfly import DragonflyStrategy
from damselfly.scheduler.state import SEED, SENT_PEER, SchedulerState, TaskEntry

pytestmark = pytest.mark.timeout(10)


def test_a_peer_ranged_with_no_length_downloads_the_whole_task():
    st = SchedulerState(Settings(), DragonflyStrategy())
    st.hosts["h"] = Host(id="h", ip="10.0.0.1", hostname="n", port=4000)
    st.peers["p"] = Peer(id="p", task_id="t", host_id="h")
    st.set_range("p", (0, 0))
    assert st.range_of("p") is None and not st.ranges
    st.set_range("p", (4096, 100))
    assert st.range_of("p") == (4096, 100)
    st.set_range("p", None)  # registered again, for the whole task
    assert st.range_of("p") is None
    st.set_range("p", (0, 10))
    st.remove_peer("p")
    assert st.range_of("p") is None and not st.ranges


def test_a_recorded_piece_counts_as_a_change_only_when_its_digest_is_taken():
    entry = TaskEntry(Task(id="t", content_length=8, piece_length=4))
    assert entry.record_piece(PieceRecord(0, 0, 4, "crc32:1"), SENT_PEER)
    assert entry.pieces_version == 1
    assert not entry.record_piece(PieceRecord(0, 0, 4, "crc32:1"), SENT_PEER)  # the same again
    assert not entry.record_piece(PieceRecord(0, 0, 4, "crc32:2"), SENT_PEER)  # a conflict: the first kept
    assert entry.pieces_version == 1 and entry.task.pieces[0].digest == "crc32:1"
    assert entry.record_piece(PieceRecord(0, 0, 4, "crc32:3"), SEED)  # a seed's wins over a peer's
    assert entry.pieces_version == 2 and entry.task.pieces[0].digest == "crc32:3"
    assert not entry.digests_complete
    assert entry.record_piece(PieceRecord(1, 4, 4, "crc32:4"), SEED)
    assert entry.digests_complete


def test_a_finished_peer_outlives_the_peer_ttl_while_its_host_announces_and_goes_with_the_host():
    st = SchedulerState(Settings(), DragonflyStrategy())
    ttl = st.cfg.peer_ttl
    st.hosts["h"] = Host(id="h", ip="10.0.0.1", hostname="n", port=4000, interval=60.0)
    for pid, state in (("done", PeerState.SUCCEEDED), ("stuck", PeerState.RUNNING)):
        st.peers[pid] = Peer(id=pid, task_id="t", host_id="h", state=state)
        st.hosts["h"].peer_ids.add(pid)
        st.entry("t").task.peer_ids.add(pid)
    later = ttl + 1
    st.hosts["h"].announced_at = later  # the host kept announcing
    st.collect(later)
    assert set(st.peers) == {"done"} and "t" in st.tasks
    st.collect(later + 3 * 60.0)  # the host went silent
    assert not st.peers and "h" not in st.hosts
