"""A peer's piece costs and the bad-parent rule (upstream's: last cost above mean + 3 sigma,
or above 20 x the mean while fewer than 30 costs are known)."""

import pytest

from damselfly.core.peer import Peer, PeerState

pytestmark = pytest.mark.timeout(10)


def running() -> Peer:
    return Peer(id="p", task_id="t", host_id="h", state=PeerState.RUNNING)


def test_add_cost_keeps_the_most_recent():
    p = running()
    for i in range(101):
        p.add_cost(float(i))
        assert len(p.piece_costs) == min(i + 1, 64)
    assert p.piece_costs == [float(i) for i in range(37, 101)]  # the last 64
    p.add_cost(7.0, keep=3)
    assert p.piece_costs == [99.0, 100.0, 7.0]


def test_an_outlier_among_few_costs_is_twenty_times_the_mean():
    p = running()
    for _ in range(10):
        p.add_cost(0.1)
    assert not p.is_bad()
    p.add_cost(1.9)  # 19 x the mean of the others
    assert not p.is_bad()
    p.add_cost(0.1)
    p.add_cost(6.0)  # above 20 x the mean (0.25) now: is_bad sees the new cost, not a kept answer
    assert p.is_bad()


def test_an_outlier_among_many_costs_is_three_sigma_above_the_mean():
    p = running()
    for i in range(40):
        p.add_cost(0.1 if i % 2 else 0.3)  # mean 0.2, sigma 0.1
    p.add_cost(0.49)
    assert not p.is_bad()
    p.add_cost(0.55)
    assert p.is_bad()


def test_only_a_running_peer_is_judged_by_its_costs():
    p = running()
    for c in (0.1, 0.1, 10.0):
        p.add_cost(c)
    assert p.is_bad()
    for state, bad in [
        (PeerState.SUCCEEDED, False),
        (PeerState.BACK_TO_SOURCE, False),
        (PeerState.PENDING, True),
        (PeerState.FAILED, True),
        (PeerState.LEAVE, True),
    ]:
        p.state = state
        assert p.is_bad() is bad, state
