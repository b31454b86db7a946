"""The swarm lab's model, without namespaces: the bounds, the scenarios and what a profile sets."""

import pytest

from damselfly.testing import netns, netswarm, swarmconfig

pytestmark = pytest.mark.timeout(30)

MiB = swarmconfig.MiB
F = 128 * MiB * 8  # bits


def test_the_default_lab_is_bound_by_the_slowest_download():
    cfg = swarmconfig.SwarmConfig()  # 16 hosts at 50 Mbit/s, origin 400 Mbit/s, 128 MiB
    assert cfg.t_min() == pytest.approx(21.47483648)
    assert swarmconfig.scenario_config("uniform").t_min() == pytest.approx(21.47483648)
    assert all(cfg.own_t_min(n) == pytest.approx(cfg.t_min()) for n in cfg.peer_names())


def test_each_term_of_the_heterogeneous_bound_can_bind():
    # the origin sends every bit once
    assert swarmconfig.kumar_ross(MiB, 8_000_000, [100_000_000] * 3, [100_000_000] * 3) == pytest.approx(1.048576)
    # the slowest receiver receives every bit
    assert swarmconfig.kumar_ross(MiB, 800_000_000, [100_000_000, 80_000_000], [100_000_000, 8_000_000]) == (
        pytest.approx(1.048576)
    )
    # n copies cross the uploads of the origin and the receivers: with uploads a tenth of the
    # downloads (no lab link is like that) the aggregate term binds, 3 F / (100 + 3 x 10) Mbit/s
    uploads, downloads = [10_000_000] * 3, [100_000_000] * 3
    assert swarmconfig.kumar_ross(MiB, 100_000_000, uploads, downloads) == pytest.approx(3 * MiB * 8 / 130_000_000)
    with pytest.raises(ValueError, match="per receiver"):
        swarmconfig.kumar_ross(MiB, 1, [1, 2], [1])


def test_a_mixed_swarm_is_bound_by_its_slow_hosts_and_each_host_by_its_own_link():
    cfg = swarmconfig.scenario_config("mixed")
    assert [cfg.rate_of(n) for n in cfg.peer_names()] == [200_000_000] * 4 + [50_000_000] * 12
    assert cfg.origin_rate_bits == 100_000_000 and cfg.seed_rate == 50_000_000
    assert cfg.classes() == {"fast": ["h1", "h2", "h3", "h4"], "slow": [f"h{i}" for i in range(5, 17)]}
    assert cfg.t_min() == pytest.approx(F / 50_000_000)  # the slow hosts' F / d
    # a fast host could have the file once the origin has sent it: F / r_origin, not its own F / d
    assert cfg.own_t_min("h1") == pytest.approx(F / 100_000_000)
    assert cfg.own_t_min("h16") == pytest.approx(cfg.t_min())
    # it scales with --hosts, and an explicit origin or fast rate stays
    small = swarmconfig.scenario_config("mixed", hosts=8, rate_bits=100_000_000, origin_rate_bits=400_000_000)
    assert small.fast_hosts == 2 and small.fast_rate_bits == 400_000_000 and small.origin_rate_bits == 400_000_000
    assert swarmconfig.scenario_config("uniform").classes() == {"all": [f"h{i}" for i in range(1, 17)]}


def test_churn_joins_a_quarter_late_and_kills_an_eighth_of_those_that_start():
    cfg = swarmconfig.scenario_config("churn")
    assert cfg.late_names() == ["h13", "h14", "h15", "h16"]
    assert cfg.killed_names() == ["h1", "h2"]
    assert (cfg.join_at, cfg.kill_at) == (0.3, 0.5)
    assert cfg.t_min() == pytest.approx(21.47483648)  # the yardstick of the same swarm without churn
    small = swarmconfig.scenario_config("churn", hosts=4)
    assert small.late_names() == ["h4"] and small.killed_names() == ["h1"]
    assert swarmconfig.scenario_config("churn", hosts=4, late_hosts=0, killed_hosts=2).killed_names() == ["h1", "h2"]
    assert not swarmconfig.scenario_config("uniform").late_names()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": 0}, "at least one host"),
        ({"hosts": 4, "fast_hosts": 5, "fast_rate_bits": 1}, "fast_hosts"),
        ({"hosts": 4, "fast_hosts": 1}, "fast_rate_bits"),
        ({"hosts": 4, "late_hosts": 2, "killed_hosts": 2}, "at least one host"),
        ({"hosts": 4, "join_at": -1.0}, "not negative"),
    ],
)
def test_a_lab_that_cannot_run_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swarmconfig.SwarmConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown scenario"):
        swarmconfig.scenario_config("flash-crowd")


def test_out_of_box_sets_nothing_but_where_each_process_lives():
    profile = swarmconfig.PROFILES["out-of-box"]
    assert profile.scheduler_env == {} and profile.daemon_env == {} and not profile.seed_env
    assert not profile.declare_rates
    lab = object.__new__(netswarm.SwarmLab)  # _env reads only the config: no network needed
    lab.cfg = swarmconfig.SwarmConfig(subnet="10.81.0")
    host = netns.NetHost("h1", "dfsc-h1", "10.81.0.13", "dfsc13", 50_000_000)
    plumbing = {
        "DAMSELFLY_LOG__LEVEL",
        "DAMSELFLY_HOST__IP",
        "DAMSELFLY_HOST__HOSTNAME",
        "DAMSELFLY_DAEMON__LISTEN_IP",
        "DAMSELFLY_SCHEDULER__LISTEN_IP",
        "DAMSELFLY_PROXY__ENABLED",
        "DAMSELFLY_PLUGINS__AUTOLOAD",
        "DAMSELFLY_SECURITY__SOURCES__ALLOW_NETWORKS",
    }
    env = lab._env(host, profile.daemon_env, profile.declare_rates)
    assert {k for k in env if k.startswith("DAMSELFLY_")} == plumbing
    assert env["DAMSELFLY_SECURITY__SOURCES__ALLOW_NETWORKS"] == '["10.81.0.0/24"]'
    declared = lab._env(
        host, swarmconfig.PROFILES["dragonfly"].daemon_env, swarmconfig.PROFILES["dragonfly"].declare_rates
    )
    assert declared["DAMSELFLY_HOST__MAX_TX_BANDWIDTH"] == str(50_000_000 // 8)
