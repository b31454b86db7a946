"""The dragonfly strategy scores like upstream's evaluator."""

import random

import pytest

from damselfly.contracts import Candidate
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.core.task import Task
from damselfly.plugins.scheduler import dragonfly
from damselfly.plugins.scheduler.dragonfly import DragonflyStrategy
from damselfly.plugins.scheduler.random import RandomStrategy

GBIT = 1_000_000_000


def cand(name, *, seed=False, idc="", location="", tx=0, uploaded=0, state=PeerState.SUCCEEDED):
    host = Host(
        id=name,
        ip="127.0.0.1",
        hostname=name,
        port=1,
        type=HostType.SUPER_SEED if seed else HostType.NORMAL,
        idc=idc,
        location=location,
        max_tx_bandwidth=GBIT,
        tx_bandwidth=tx,
        upload_content_length=uploaded,
    )
    return Candidate(Peer(id=f"{name}-p", task_id="t", host_id=name, state=state), host)


def test_component_scores():
    h = cand("a", tx=GBIT // 4).host
    # 0.5 x free peak (0.75) + 0.3 x duration (1: nothing uploaded) + 0.2 x concurrency (1: idle)
    assert dragonfly.load_quality(h) == pytest.approx(0.5 * 0.75 + 0.3 + 0.2)
    h.upload_content_length = GBIT // 8 * 30  # 30 s of the link in the last minute: duration 0.5
    assert dragonfly.load_quality(h) == pytest.approx(0.5 * 0.75 + 0.3 * 0.5 + 0.2)
    h.concurrent_upload_pieces = 15  # twice the ~7.45 pieces its bandwidth needs: concurrency 0.5
    assert dragonfly.load_quality(h) == pytest.approx(0.5 * 0.75 + 0.3 * 0.5 + 0.2 * (GBIT / (16 << 20) / 8) / 15)
    h.max_tx_bandwidth = 0
    assert dragonfly.load_quality(h) == 0.0
    assert dragonfly.location_affinity("a|b|c|d|e", "a|b|x") == pytest.approx(0.4)
    assert dragonfly.location_affinity("", "a") == 0.0
    assert dragonfly.idc_affinity("IDC1", "idc1") == 1.0


def test_rank_prefers_idle_same_idc_parents():
    child = cand("child", idc="x", location="cn|bj")
    busy = cand("busy", idc="x", tx=GBIT * 9 // 10)
    far = cand("far", idc="y")
    near = cand("near", idc="x", location="cn|bj")
    ranked = DragonflyStrategy().rank(child, [busy, far, near], Task(id="t"))
    assert [c.host.id for c in ranked] == ["near", "far", "busy"]


def test_running_seed_beats_a_normal_peer_on_host_type():
    child = cand("child")
    seed = cand("seed", seed=True, state=PeerState.RUNNING)
    normal = cand("normal")
    assert dragonfly.host_type_score(seed) == 1.0 and dragonfly.host_type_score(normal) == 0.5
    assert DragonflyStrategy().rank(child, [normal, seed], Task(id="t"))[0].host.id == "seed"


def test_random_keeps_every_candidate():
    cs = [cand(f"h{i}") for i in range(10)]
    assert sorted(c.host.id for c in RandomStrategy().rank(cand("c"), cs, Task(id="t"))) == sorted(
        c.host.id for c in cs
    )


def test_locality_puts_the_same_idc_and_the_nearest_location_first():
    from damselfly.plugins.scheduler.locality import LocalityStrategy

    child = cand("child", idc="hz", location="asia|cn|hz|rack1")
    busy_same_rack = cand("busy-same-rack", idc="hz", location="asia|cn|hz|rack1", tx=GBIT * 9 // 10)
    idle_same_idc = cand("idle-same-idc", idc="hz", location="asia|cn|hz|rack9")
    idle_same_idc_2 = cand("idle-same-idc-2", idc="hz", location="asia|cn|hz|rack8", uploaded=10 * GBIT)
    idle_far = cand("idle-far", idc="sh", location="asia|cn|sh|rack1")
    idle_nowhere = cand("idle-nowhere")
    ranked = LocalityStrategy().rank(
        child, [idle_nowhere, idle_far, idle_same_idc_2, busy_same_rack, idle_same_idc], Task(id="t")
    )
    names = [c.host.id for c in ranked]
    assert names[0] == "busy-same-rack"  # closest wins even though busier
    assert names[1:3] == ["idle-same-idc", "idle-same-idc-2"]  # equally close: the less loaded first
    assert names[3:] == ["idle-far", "idle-nowhere"]  # the far ones still rank, last
    # dragonfly would have put the idle same-IDC parent ahead of the busy same-rack one
    assert DragonflyStrategy().rank(child, [busy_same_rack, idle_same_idc], Task(id="t"))[0].host.id == "idle-same-idc"


def test_swarm_puts_the_seed_first_then_peers_with_more_pieces():
    from damselfly.plugins.scheduler.swarm import SwarmStrategy

    child = cand("child")
    seed = cand("seed", seed=True, state=PeerState.RUNNING)
    rich, poor = cand("rich", state=PeerState.RUNNING), cand("poor", state=PeerState.RUNNING)
    rich.peer.finished_pieces.update(range(10))
    poor.peer.finished_pieces.update(range(2))
    ranked = SwarmStrategy().rank(child, [poor, rich, seed], Task(id="t"))
    assert [c.host.id for c in ranked] == ["seed", "rich", "poor"]
    assert SwarmStrategy.dag is False and DragonflyStrategy.dag is True


def test_a_mesh_strategy_lets_two_peers_be_parents_of_each_other():
    """Upstream's DAG keeps a peer's descendants from becoming its parents; ``swarm`` does not."""
    from damselfly.config import Settings
    from damselfly.core.peer import Peer
    from damselfly.plugins.scheduler.swarm import SwarmStrategy
    from damselfly.scheduler.state import SchedulerState

    def state(strategy):
        st = SchedulerState(Settings(), strategy)
        for name in ("a", "b"):
            st.hosts[name] = cand(name).host
        task = st.entry("t").task
        a = Peer(id="a-p", task_id="t", host_id="a", state=PeerState.RUNNING)
        b = Peer(id="b-p", task_id="t", host_id="b", state=PeerState.RUNNING)
        a.children.add(b.id)  # b fetches from a
        b.parents.add(a.id)
        a.parents.add("elsewhere")  # a has a parent, so it has pieces to give
        for p in (a, b):
            st.peers[p.id] = p
            task.peer_ids.add(p.id)
        return st, a

    st, a = state(DragonflyStrategy())
    assert st.candidates(a) == []  # b is below a in the DAG
    st, a = state(SwarmStrategy())
    assert [c.peer.id for c in st.candidates(a)] == ["b-p"]
    assert st.parent_limit == SwarmStrategy.parent_limit


def test_candidates_look_past_the_first_draw_when_it_holds_no_usable_parent():
    """A decision draws 2 x filter_parent_limit peers at random first; when none of them can
    serve, it goes on through the rest rather than answer with no parent."""
    from damselfly.config import Settings
    from damselfly.core.peer import Peer
    from damselfly.scheduler.state import SchedulerState

    st = SchedulerState(Settings(), DragonflyStrategy())
    for name in ("child", "other"):
        st.hosts[name] = cand(name).host
    task = st.entry("t").task
    child = Peer(id="child-p", task_id="t", host_id="child", state=PeerState.RUNNING)
    st.peers[child.id] = child
    task.peer_ids.add(child.id)
    for i in range(200):  # peers on the child's own host: never its parents
        p = Peer(id=f"same-{i}", task_id="t", host_id="child", state=PeerState.SUCCEEDED)
        st.peers[p.id] = p
        task.peer_ids.add(p.id)
    only = Peer(id="only-p", task_id="t", host_id="other", state=PeerState.SUCCEEDED)
    st.peers[only.id] = only
    task.peer_ids.add(only.id)
    for _ in range(20):  # whatever the draw, the one usable peer is found
        assert [c.peer.id for c in st.candidates(child)] == ["only-p"]


def test_scores_in_one_loop_equal_the_scores_one_by_one():
    """``scores`` (the loop ``rank`` uses) gives each parent what ``score`` gives it: every load
    term's branch, seeds in each state, idle and missing bandwidth, IDCs and locations equal
    by identity, by value and by case only, empty ones."""
    rng = random.Random(7)
    idcs = ["", "idc-1", "IDC-1", "idc-2"]
    locations = ["", "cn|bj|r1", "CN|bj|r1", "cn|bj|r2", "cn|sh", "cn"]
    states = list(PeerState)
    parents = []
    for i in range(400):
        c = cand(
            f"h{i}",
            seed=rng.random() < 0.2,
            idc="".join(rng.choice(idcs)),  # a new string object: equal, not identical
            location=rng.choice(locations),
            tx=rng.choice([0, GBIT // 3, GBIT, 2 * GBIT]),
            uploaded=rng.choice([0, GBIT // 8 * 15, GBIT * 60]),
            state=rng.choice(states),
        )
        c.host.max_tx_bandwidth = rng.choice([0, 100_000_000, GBIT])
        c.host.concurrent_upload_pieces = rng.choice([0, 3, 40])
        parents.append(c)
    for child in (cand("c1", idc="idc-1", location="cn|bj|r1"), cand("c2"), parents[3]):
        got = dragonfly.scores(child, parents)
        assert got == [dragonfly.score(p, child) for p in parents]
        ranked = DragonflyStrategy().rank(child, parents, Task(id="t"))
        assert ranked == sorted(parents, key=lambda p: dragonfly.score(p, child), reverse=True)
    assert len(set(dragonfly.scores(parents[0], parents))) > 20  # the inputs do spread the scores
