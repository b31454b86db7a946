"""A small version of benchmarks/swarm.py: shaped hosts in network namespaces, checked for correctness.

Four hosts, a seed and an origin, each in its own namespace with tc-shaped links;
every host downloads one file at once through the swarm, with the defaults
(``out-of-box``) and with upstream's behaviour (``dragonfly``). This checks what
must hold at any speed: every copy is whole (sha256), the origin sent the file
once, the hosts also fetched it straight from the origin for the baseline, and
nothing (namespace, link, process) is left behind. With churn (a host joins late,
one is killed mid-download) every staying host still gets a whole copy. Speed is
benchmarks/swarm.py's job.
"""

import json
import subprocess

import pytest

from damselfly.testing import netns, netswarm, swarmconfig

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(netns.unavailable() is not None, reason=f"netns: {netns.unavailable()}"),
]

PREFIX = "dfci"


def leftovers() -> list[str]:
    listed = subprocess.run(["ip", "-j", "netns", "list"], check=False, capture_output=True, text=True).stdout
    names = [n["name"] for n in json.loads(listed or "[]") if n["name"].startswith(PREFIX + "-")]
    bridge = subprocess.run(["ip", "link", "show", f"{PREFIX}br"], check=False, capture_output=True)
    return names + ([f"{PREFIX}br"] if bridge.returncode == 0 else [])


def test_a_shaped_swarm_delivers_every_copy_and_reads_the_origin_once(tmp_path):
    cfg = swarmconfig.SwarmConfig(
        hosts=4,
        rate_bits=200_000_000,
        origin_rate_bits=400_000_000,
        size=16 * swarmconfig.MiB,
        piece_length=swarmconfig.MiB,
        prefix=PREFIX,
        subnet="10.79.0",
    )
    with netswarm.SwarmLab(cfg, tmp_path) as lab:
        assert sorted(h.name for h in lab.peer_hosts) == ["h1", "h2", "h3", "h4"]
        out_of_box = lab.run(swarmconfig.PROFILES["out-of-box"], verify=True)  # verify: each copy's sha256
        dragonfly = lab.run(swarmconfig.PROFILES["dragonfly"], verify=True)
        direct = lab.direct()
    assert leftovers() == []
    for r in (out_of_box, dragonfly):
        assert len(r["seconds"]) == 4
        assert r["correct_hosts"] == ["h1", "h2", "h3", "h4"]
        assert r["origin_ratio"] == 1.0  # every piece was read from the origin once
        assert r["max_ratio"] >= 1.0 and r["max_own_ratio"] >= 1.0  # nothing beats the bound
        assert 0 < r["cpu_seconds_download"] <= r["cpu_seconds"]
        # over the GiB delivered: 4 copies of 16 MiB (cpu_seconds_download is rounded to 0.01 s)
        assert r["cpu_seconds_per_gib"] == pytest.approx(r["cpu_seconds_download"] / (4 / 64), abs=0.1)
        assert r["scheduler_cpu_seconds"] >= 0
    assert dragonfly["source_readers"] == 1  # upstream's seed alone
    # the defaults share the read: the seed and the peers that were waiting when it registered
    # (all of them, as they start at once) read a block each
    assert out_of_box["source_readers"] >= 2
    assert direct["origin_ratio"] == 4.0 and len(direct["seconds"]) == 4
    # in the defaults' mesh a parent is a child too: pieces it announced to a peer are not announced back
    assert out_of_box["sync_pieces_skipped"] > 0 and out_of_box["sync_piece_messages"] > 0
    assert cfg.t_min() == pytest.approx(16 * swarmconfig.MiB * 8 / 200_000_000)


# Usually under 10 s. The pieces a killed host had read as its share of the source, and nobody
# else held yet, go to the seed when its stream ends (before that fix the others waited 60 s for
# them), so no staying host waits on the dead one.
@pytest.mark.timeout(120)
def test_with_churn_every_staying_host_gets_a_whole_copy(tmp_path):
    cfg = swarmconfig.SwarmConfig(
        hosts=5,
        rate_bits=200_000_000,
        origin_rate_bits=400_000_000,
        size=16 * swarmconfig.MiB,
        piece_length=swarmconfig.MiB,
        late_hosts=1,  # h5 starts at 0.3 x T_min
        killed_hosts=1,  # h1 is killed at 0.5 x T_min, mid-download (no host can finish before T_min)
        prefix=PREFIX,
        subnet="10.79.0",
    )
    with netswarm.SwarmLab(cfg, tmp_path) as lab:
        r = lab.run(swarmconfig.PROFILES["out-of-box"], verify=True)
    assert leftovers() == []
    assert r["left"] == ["h1"] and r["joined"] == ["h5"]
    assert r["correct_hosts"] == ["h2", "h3", "h4", "h5"]  # each copy's sha256
    assert len(r["seconds"]) == 4  # the staying hosts, each from its own start
    joiner = r["joiners"]["h5"]
    assert joiner["daemon_started"] >= cfg.join_at * cfg.t_min()
    assert joiner["download_started"] > joiner["daemon_started"]  # once its daemon was ready and known
    assert joiner["seconds_from_common_start"] == pytest.approx(
        joiner["download_started"] + joiner["seconds_from_own_start"], abs=0.002
    )
    assert r["cpu_seconds_per_gib"] > 0


def test_the_bound_takes_the_slowest_of_its_terms():
    cfg = swarmconfig.SwarmConfig(hosts=16, rate_bits=50_000_000, size=128 * swarmconfig.MiB)
    assert cfg.t_min() == pytest.approx(21.47483648)  # F / d_min, as in shared/BASELINES.md
    slow_origin = swarmconfig.SwarmConfig(hosts=16, rate_bits=50_000_000, origin_rate_bits=10_000_000, size=1 << 20)
    assert slow_origin.t_min() == pytest.approx((1 << 20) * 8 / 10_000_000)  # the origin sends every bit once
    # A slow seed bounds the swarm as a receiver (F / d_seed), not as the server: the peers read
    # their shares of the source from the origin, so the old F / u_seed term (the bound with
    # the seed as the only server) does not hold. On this lab's symmetric links the two are
    # the same number.
    slow_seed = swarmconfig.SwarmConfig(hosts=100, rate_bits=10_000_000, seed_rate_bits=5_000_000, size=1 << 20)
    assert slow_seed.t_min() == pytest.approx((1 << 23) / 5_000_000)  # F / d_seed


def test_a_killed_run_is_swept_by_the_next(tmp_path):
    net = netns.Network(PREFIX, "10.79.0")
    net.add_host("stale", 10_000_000)
    assert leftovers()  # as if the run had been killed here
    netns.Network.sweep(PREFIX)
    assert leftovers() == []


def test_links_take_the_configured_mtu():
    with pytest.raises(ValueError, match="MTU"):
        netns.Network(PREFIX, "10.79.0", mtu=100)
    net = netns.Network(PREFIX, "10.79.0", mtu=9000)
    try:
        host = net.add_host("jumbo", 10_000_000)
        inner = subprocess.run(
            ["ip", "netns", "exec", host.ns, "ip", "-j", "link", "show", "eth0"], capture_output=True, text=True
        )
        outer = subprocess.run(["ip", "-j", "link", "show", host.link], capture_output=True, text=True)
        assert json.loads(inner.stdout)[0]["mtu"] == 9000 and json.loads(outer.stdout)[0]["mtu"] == 9000
    finally:
        net.close()
    assert leftovers() == []
