"""Which peers the scheduler offers as parents: each rule of SchedulerState.candidates."""

import pytest

from damselfly.config import load_settings
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.plugin_manager import build_plugins
from damselfly.scheduler import SchedulerService
from damselfly.telemetry.metrics import SchedulerMetrics

pytestmark = pytest.mark.timeout(30)


# up to twice filter_parent_limit (100) a task is shuffled; past that it is walked from a random point
@pytest.mark.parametrize("peers_in_task", [20, 250])
def test_only_peers_that_can_serve_are_offered(peers_in_task):
    settings = load_settings(
        plugins={"autoload": False},
        log={"level": "WARNING"},
        scheduler={"candidate_parent_limit": 100, "filter_parent_limit": 100},
    )
    svc = SchedulerService(settings, build_plugins(settings), SchedulerMetrics())
    st = svc.state
    entry = st.entry("t" * 64)
    entry.task.content_length, entry.task.piece_length = 64 << 20, 4 << 20

    def add(pid: str, state: PeerState, host: str = "", **kw) -> Peer:
        host = host or f"h-{pid}"
        if host not in st.hosts:
            st.hosts[host] = Host(id=host, ip="10.0.0.1", hostname=host, port=4000, max_tx_bandwidth=10**9)
        p = Peer(id=pid, task_id=entry.task.id, host_id=host, state=state, **kw)
        st.peers[pid] = p
        entry.task.peer_ids.add(pid)
        return p

    child = add("child", PeerState.RUNNING, host="h-child")
    expected = {
        add("done", PeerState.SUCCEEDED).id,
        add("source", PeerState.BACK_TO_SOURCE).id,
        add("running-with-parent", PeerState.RUNNING, parents={"done"}).id,
    }
    add("seed-running", PeerState.RUNNING, host="h-seed")
    st.hosts["h-seed"].type = HostType.SUPER_SEED
    expected.add("seed-running")  # a seed has something to give before it has a parent
    add("same-host", PeerState.SUCCEEDED, host="h-child")
    add("pending", PeerState.PENDING)
    add("failed", PeerState.FAILED)
    add("running-no-parent", PeerState.RUNNING)
    add("not-shared", PeerState.SUCCEEDED)
    st.hosts["h-not-shared"].disable_shared = True
    add("blocked", PeerState.SUCCEEDED)
    child.blocklist.add("blocked")
    slow = add("slow", PeerState.RUNNING, parents={"done"})
    for _ in range(10):
        slow.add_cost(0.1)
    slow.add_cost(30.0)  # the last piece far above the mean: a bad parent
    gone = add("gone", PeerState.SUCCEEDED)
    del st.peers[gone.id]  # left the state, still listed by its task
    # ranged: a peer that fetched only the first piece holds nothing the child's range needs
    add("first-piece-only", PeerState.SUCCEEDED)
    st.set_range("first-piece-only", (0, 4 << 20))
    st.set_range("child", (8 << 20, 4 << 20))
    for i in range(peers_in_task - len(entry.task.peer_ids)):
        add(f"filler-{i}", PeerState.PENDING)

    for _ in range(5):  # every order gives the same set
        assert {c.peer.id for c in st.candidates(child)} == expected
    assert {c.peer.id for c in st.candidates(child, exclude={"done"})} == expected - {"done"}
