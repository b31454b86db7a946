"""The scheduler's limits on reads of the source: a task's back_to_source_limit on every path,
and origin_reads readers of one origin at once, across tasks."""

import pytest

from damselfly.config import Settings
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.plugins.scheduler.dragonfly import DragonflyStrategy
from damselfly.scheduler.answers import Answers
from damselfly.scheduler.scheduling import Scheduling, origin_of
from damselfly.scheduler.state import SchedulerState, TaskEntry
from damselfly.telemetry.metrics import SchedulerMetrics

pytestmark = pytest.mark.timeout(10)


def scheduling(**cfg: int) -> Scheduling:
    settings = Settings(scheduler=cfg)
    st = SchedulerState(settings, DragonflyStrategy())
    st.hosts["h"] = Host(id="h", ip="10.0.0.1", hostname="n", port=4000)
    st.hosts["s"] = Host(id="s", ip="10.0.0.2", hostname="seed", port=4000, type=HostType.SUPER_SEED)
    return Scheduling(settings, st, Answers(), SchedulerMetrics())


def task(s: Scheduling, task_id: str, url: str) -> TaskEntry:
    entry = s.state.entry(task_id)
    entry.task.url = url
    return entry


def peer(s: Scheduling, entry: TaskEntry, peer_id: str, host: str = "h") -> Peer:
    p = s.state.peers[peer_id] = Peer(id=peer_id, task_id=entry.task.id, host_id=host, need_back_to_source=True)
    entry.task.peer_ids.add(peer_id)
    return p


def test_a_peer_asking_for_the_source_is_held_to_the_tasks_limit():
    s = scheduling(back_to_source_limit=1)
    entry = task(s, "t", "http://o/x")
    first, second = peer(s, entry, "p1"), peer(s, entry, "p2")
    assert s.may_read_source(entry, first, s.state.hosts["h"])
    s.back_to_source(entry, first, "the peer asked for it")
    assert not s.may_read_source(entry, second, s.state.hosts["h"])
    assert not second.need_back_to_source  # scheduled like any peer instead
    assert s.may_read_source(entry, first, s.state.hosts["h"])  # one already sent is not refused again


def test_a_seed_asking_for_the_source_is_never_held_back():
    s = scheduling(back_to_source_limit=0, origin_reads=1)
    entry = task(s, "t", "http://o/x")
    seed = peer(s, entry, "ps", host="s")
    assert s.may_read_source(entry, seed, s.state.hosts["s"])


def test_readers_of_one_origin_are_capped_across_tasks_and_freed_as_they_finish():
    s = scheduling(origin_reads=1)
    x, y, other = task(s, "tx", "http://o/x"), task(s, "ty", "http://o:80/y"), task(s, "tz", "http://p/z")
    reader = peer(s, x, "p1")
    s.back_to_source(x, reader, "no seed peer and no parent")
    waiting = peer(s, y, "p2")
    assert s.origin_full(y, waiting) and not s.may_read_source(y, waiting, s.state.hosts["h"])
    assert not s.origin_full(other, peer(s, other, "p3"))  # another origin has its own readers
    reader.state = PeerState.SUCCEEDED
    assert not s.origin_full(y, waiting)


def test_nobody_is_sent_to_the_source_past_the_limits_when_no_seed_can_read():
    s = scheduling(origin_reads=1, back_to_source_limit=5)
    del s.state.hosts["s"]  # no seed to trigger
    x, y = task(s, "tx", "http://o/x"), task(s, "ty", "http://o/y")
    first = peer(s, x, "p1")
    first.need_back_to_source = False
    answer = s.schedule_now(first, 0.0, None)
    assert answer is not None and answer.WhichOneof("response") == "need_back_to_source_response"
    second = peer(s, y, "p2")
    second.need_back_to_source = False
    assert s.schedule_now(second, 0.0, None) is None  # it waits for a parent or a free read
    first.state = PeerState.SUCCEEDED
    answer = s.schedule_now(second, 0.0, None)
    assert answer is not None and answer.WhichOneof("response") == "need_back_to_source_response"


def test_an_origin_is_its_scheme_host_and_port():
    assert origin_of("http://o/x") == origin_of("http://o:80/y") == "http://o:80"
    assert origin_of("https://user@O:8443/z") == "https://o:8443"
    assert origin_of("hdfs://nn/f") == "hdfs://nn"
