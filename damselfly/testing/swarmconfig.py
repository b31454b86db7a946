"""The swarm lab's model: what a run is configured with (``SwarmConfig``, the three scenarios of
benchmarks/swarm.py), the strategies under test (``Profile``, ``PROFILES``), the Kumar-Ross bound
a run is judged against (``kumar_ross``, ``own_bound``) and the CPU a process spent (``cpu_times``).
Plain data and arithmetic: the simulator (benchmarks/simulate.py) and the lab share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from damselfly.testing.netns import MTU

MiB = 1 << 20


@dataclass
class Profile:
    """A strategy under test: the settings of the scheduler, the seed and the peers.

    ``declare_rates`` tells each shaped host's daemon its link's rate
    (``DAMSELFLY_HOST__MAX_TX_BANDWIDTH`` and ``MAX_RX_BANDWIDTH``), which its operator would
    have to know; ``out-of-box`` leaves them at their defaults.
    """

    name: str
    scheduler_env: dict[str, str]
    daemon_env: dict[str, str]
    seed_env: dict[str, str] | None = None
    declare_rates: bool = True


def kumar_ross(size: int, origin_bits: int, uploads: Sequence[int], downloads: Sequence[int]) -> float:
    """The least time, in seconds, in which every receiver can hold all ``size`` bytes.

    Kumar and Ross's bound for heterogeneous rates with the origin as the server: damselfly's
    default (``scheduler.source_shares``) has every peer read a share of the source, so the
    origin sends to peers directly, not only to the seed. The receivers are the seed and the
    N peers, with upload ``u_i`` and download ``d_i`` (bits/s, in ``uploads`` and ``downloads``);
    with F the file's bits and r_o the origin's rate:

        T_min = max(F / r_o, F / min_i d_i, (N + 1) F / (r_o + sum_i u_i))

    The origin sends every bit at least once; the slowest receiver receives every bit; and
    the N + 1 copies cross the uploads of the origin and of the receivers. (With links as fast
    up as down, as in this lab, the last term stays below F / min d_i.)
    """
    if not uploads or len(uploads) != len(downloads):
        raise ValueError("one upload and one download rate per receiver")
    bits = size * 8
    return max(bits / origin_bits, bits / min(downloads), len(downloads) * bits / (origin_bits + sum(uploads)))


def own_bound(size: int, origin_bits: int, download_bits: int) -> float:
    """One receiver's least time: max(F / r_o, F / d_i).

    Every bit it holds came from the origin once, and all of them cross its own download.
    The aggregate term of ``kumar_ross`` bounds when the *last* copy is done, not this one:
    the swarm could serve one host first, so a fast host of a mixed swarm may finish before
    it, and a ratio against it could fall below 1.
    """
    bits = size * 8
    return max(bits / origin_bits, bits / download_bits)


@dataclass
class SwarmConfig:
    """A lab: ``hosts`` peers (h1...hN), a seed and an origin with their rates, and who joins or leaves.

    Rates are link rates in bits/s, each host's upload and download alike. The first
    ``fast_hosts`` peers run at ``fast_rate_bits``, the others at ``rate_bits``. With churn
    the last ``late_hosts`` peers start their daemons ``join_at`` x T_min after the downloads
    begin, and the first ``killed_hosts`` peers are killed at ``kill_at`` x T_min.
    """

    hosts: int = 16
    rate_bits: int = 50_000_000
    seed_rate_bits: int = 0  # 0: the hosts' rate
    origin_rate_bits: int = 400_000_000
    size: int = 128 * MiB
    piece_length: int = 0  # 0: the daemon's choice for the size
    prefix: str = "dfsw"
    subnet: str = "10.77.0"
    log_level: str = "WARNING"
    mtu: int = MTU
    fast_hosts: int = 0
    fast_rate_bits: int = 0
    late_hosts: int = 0
    killed_hosts: int = 0
    join_at: float = 0.3  # x T_min after the common start
    kill_at: float = 0.5

    def __post_init__(self) -> None:
        if self.hosts < 1:
            raise ValueError("at least one host")
        if not 0 <= self.fast_hosts <= self.hosts:
            raise ValueError(f"fast_hosts must be within 0-{self.hosts}")
        if self.fast_hosts and self.fast_rate_bits <= 0:
            raise ValueError("fast_hosts needs fast_rate_bits")
        if self.late_hosts < 0 or self.killed_hosts < 0 or self.late_hosts + self.killed_hosts >= self.hosts:
            raise ValueError("late and killed hosts must leave at least one host that starts and stays")
        if self.join_at < 0 or self.kill_at < 0:
            raise ValueError("join_at and kill_at are fractions of T_min, not negative")

    @property
    def seed_rate(self) -> int:
        return self.seed_rate_bits or self.rate_bits

    def peer_names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]

    def rate_of(self, name: str) -> int:
        """A peer's rate (``seed`` is the seed's)."""
        if name == "seed":
            return self.seed_rate
        index = int(name.removeprefix("h"))
        return self.fast_rate_bits if index <= self.fast_hosts else self.rate_bits

    def late_names(self) -> list[str]:
        """The peers whose daemons start during the downloads."""
        return self.peer_names()[self.hosts - self.late_hosts :]

    def killed_names(self) -> list[str]:
        """The peers killed mid-download (of those that start at once)."""
        return self.peer_names()[: self.killed_hosts]

    def classes(self) -> dict[str, list[str]]:
        """The peers by rate: ``fast`` and ``slow`` in a mixed swarm, ``all`` otherwise."""
        names = self.peer_names()
        if not self.fast_hosts or self.fast_rate_bits == self.rate_bits:
            return {"all": names}
        return {"fast": names[: self.fast_hosts], "slow": names[self.fast_hosts :]}

    def t_min(self) -> float:
        """``kumar_ross`` for the seed and every peer, all starting at once.

        With churn it is still the bound for all ``hosts`` starting together: late hosts
        start from a swarm that already holds pieces and killed hosts take their upload
        with them, so it is the yardstick of the same swarm without churn.
        """
        rates = [self.seed_rate, *(self.rate_of(n) for n in self.peer_names())]
        return kumar_ross(self.size, self.origin_rate_bits, rates, rates)

    def own_t_min(self, name: str) -> float:
        """``own_bound`` of one peer."""
        return own_bound(self.size, self.origin_rate_bits, self.rate_of(name))


SCENARIOS = ("uniform", "mixed", "churn")


def scenario_config(
    scenario: str,
    *,
    hosts: int = 16,
    rate_bits: int = 50_000_000,
    origin_rate_bits: int = 0,
    fast_rate_bits: int = 0,
    late_hosts: int | None = None,
    killed_hosts: int | None = None,
    **rest: Any,
) -> SwarmConfig:
    """The lab of one of benchmarks/swarm.py's scenarios; 0 or None takes the scenario's default.

    - ``uniform``: every host at ``rate_bits``, the origin at 400 Mbit/s.
    - ``mixed``: a quarter of the hosts (4 of 16) at ``fast_rate_bits`` (default 4 x ``rate_bits``:
      200 Mbit/s beside 50), the others and the seed at ``rate_bits``, the origin at
      2 x ``rate_bits`` (100 Mbit/s).
    - ``churn``: as uniform, and a quarter of the hosts (4 of 16, at least 1) join at
      0.3 x T_min; an eighth (2 of 16, at least 1) of those that start at once are killed at 0.5 x T_min.

    ``rest`` goes to ``SwarmConfig`` as it is (size, seed_rate_bits, prefix...).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    cfg: dict[str, Any] = {"hosts": hosts, "rate_bits": rate_bits, **rest}
    if scenario == "mixed":
        cfg["fast_hosts"] = max(1, hosts // 4)
        cfg["fast_rate_bits"] = fast_rate_bits or 4 * rate_bits
        cfg["origin_rate_bits"] = origin_rate_bits or 2 * rate_bits
    elif origin_rate_bits:
        cfg["origin_rate_bits"] = origin_rate_bits
    if scenario == "churn":
        cfg["late_hosts"] = max(1, hosts // 4) if late_hosts is None else late_hosts
        cfg["killed_hosts"] = max(1, hosts // 8) if killed_hosts is None else killed_hosts
    return SwarmConfig(**cfg)


def parse_bits(text: str) -> int:
    """Bits per second from ``50mbit``, ``1gbit``, ``400Mbit/s`` or ``6MB/s`` (tc's units)."""
    from damselfly.core.units import parse_size

    t = text.strip().lower().removesuffix("/s")
    for suffix, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return parse_size(text.removesuffix("/s")) * 8


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


GiB = 1 << 30


class CpuTimes(NamedTuple):
    total: float  # user and system seconds
    system: float  # the kernel's part


def cpu_times(pid: int) -> CpuTimes:
    """The CPU a process and its children have used (``ip netns exec`` execs, so it is the
    service); zeros for a process that is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        times = [p.cpu_times() for p in procs]
    except psutil.Error:
        return CpuTimes(0.0, 0.0)
    return CpuTimes(sum(t.user + t.system for t in times), sum(t.system for t in times))


def _strategy(name: str) -> dict[str, str]:
    return {"DAMSELFLY_SCHEDULER__STRATEGY": name}


# Upstream Dragonfly's behaviour in the daemons: pieces in order, 8 at once from any parents, no
# upload slots, no endgame, a 0.1 s window for other parents to report a piece, 8 source reads.
# (The daemons' defaults before issue 26.)
UPSTREAM_DAEMON = {
    "DAMSELFLY_DAEMON__PIECE_PICKER": "sequential",
    "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "8",
    "DAMSELFLY_DAEMON__SOURCE_CONCURRENT_PIECES": "8",
    "DAMSELFLY_DAEMON__SHARE_CONCURRENT_PIECES": "0",
    "DAMSELFLY_DAEMON__UPLOAD_SLOTS": "0",
    "DAMSELFLY_DAEMON__SEED_EXTRA_PIECES": "0",
    "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0.1",
    "DAMSELFLY_DAEMON__ENDGAME_DUPLICATES": "0",
}


def _upstream(strategy: str) -> Profile:
    return Profile(strategy, {**_strategy(strategy), "DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"}, UPSTREAM_DAEMON)


# What each strategy under test sets in the scheduler, the peers and the seed. ``out-of-box`` sets
# nothing at all, not even the hosts' rates: what a new user runs. ``dragonfly``, ``random`` and
# ``locality`` are upstream's behaviour (its evaluator, or another parent ranking, in a DAG, with
# upstream's daemons: sequential pieces, a seed that answers every request); ``swarm`` is the
# hand-tuned combination the defaults were taken from, with the seed's larger origin buffers besides.
PROFILES: dict[str, Profile] = {
    "out-of-box": Profile("out-of-box", {}, {}, declare_rates=False),
    "dragonfly": _upstream("dragonfly"),
    "random": _upstream("random"),
    "locality": _upstream("locality"),
    "swarm": Profile(
        "swarm",
        # the seed and the peers waiting for it each read a different block of the origin
        {**_strategy("swarm"), "DAMSELFLY_SCHEDULER__SOURCE_SHARES": "true"},
        {
            "DAMSELFLY_DAEMON__PIECE_PICKER": "rarest-first",
            "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "6",
            # 4 of them while a peer reads its share of the source: the share, new to the swarm,
            # gets more of the host's download (simulated 1.090-1.092 against 1.102-1.106)
            "DAMSELFLY_DAEMON__SHARE_CONCURRENT_PIECES": "4",
            "DAMSELFLY_DAEMON__UPLOAD_SLOTS": "6",
            # a peer's share of the source in one read, so that its first piece is whole soonest
            "DAMSELFLY_DAEMON__SOURCE_CONCURRENT_PIECES": "1",
            "DAMSELFLY_DAEMON__SEED_EXTRA_PIECES": "1",
            "DAMSELFLY_DAEMON__BUSY_BACKOFF": "0.2",
            "DAMSELFLY_DAEMON__PARENT_GATHER_WINDOW": "0",
            "DAMSELFLY_DAEMON__ENDGAME_DUPLICATES": "1",
        },
        {
            # no super-seeding: with shared reads every reader brings new pieces in, and a seed that
            # offers each piece once left its upload idle (0.2 x F sent, against 0.9 x F without it)
            "DAMSELFLY_DAEMON__UPLOAD_SLOTS": "6",
            # the seed fetches the peers' shares one at a time: each host's download comes first
            "DAMSELFLY_DAEMON__CONCURRENT_PIECES": "1",
            "DAMSELFLY_DAEMON__SOURCE_CONCURRENT_PIECES": "1",
            "DAMSELFLY_DAEMON__SOURCE_STREAM": "true",
            # the seed's read of the origin is the critical path: a fixed socket buffer and a larger
            # read-ahead let it ride out the moments its event loop is busy serving children
            "DAMSELFLY_SOURCES": json.dumps({"http": {"socket_buffer": 4 << 20, "read_buffer": 4 << 20}}),
        },
    ),
}
