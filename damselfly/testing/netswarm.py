"""A swarm of hosts in network namespaces with shaped links, for benchmarks and tests.

Each host is a network namespace on one bridge, with its own 10.x address. Its
upload is shaped on its own end of the veth and its download on the bridge's end
(both egress qdiscs, so no ifb is needed): ``htb`` at the host's rate, small
packets (ACKs, gRPC messages, piece requests) in a class served first and bulk
data in a short byte-counted ``bfifo`` (this kernel has no fq_codel or sfq), so
control traffic does not queue behind bulk data. The kernel shapes, so the rates
hold however busy the two CPUs are. Each namespace's TCP is tuned for emulating
many hosts on two cores (``SYSCTLS``).

One damselfly process runs per host (``ip netns exec``), each in its own process
group; ``Network.close`` kills whatever is left in the namespaces, deletes them and
the bridge, and ``Network.sweep`` removes what an earlier, killed run left behind.
Needs root (CAP_NET_ADMIN); ``unavailable()`` says why not otherwise. Traffic stays
on this machine: the addresses are on a bridge made here.

A run (``SwarmLab.run``) starts a scheduler, a seed and one daemon per host with a
``Profile``'s settings; every host downloads one file at once and the run reports each
host's time over the Kumar-Ross bound (``kumar_ross``), the origin's bytes, the CPU the
daemons spent per GiB delivered. ``SwarmConfig`` gives hosts different rates (``mixed``)
and lets hosts join late and leave (``churn``): ``scenario_config`` builds the three
scenarios of benchmarks/swarm.py. ``out-of-box`` sets no tuning; the lab sets only where
each process lives (addresses, host name, scheduler, data directory, seed or not, log
level, no proxy and no plugin autoloading) and that the origin's private subnet is allowed.
The other profiles also declare each shaped host's rate (``host.max_tx_bandwidth`` and
``max_rx_bandwidth``), as an operator who knows the links would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from damselfly.core.errors import DamselflyError
from damselfly.sandbox import cluster as cl
from damselfly.sandbox.demo import scrape

READY_TIMEOUT = 90.0
# Per-namespace TCP settings of the emulated hosts. Seventeen hosts share two cores here, so
# the emulation's cost per packet matters: this machine defaults to BBR, which paces each flow
# with timers in bursts of about a millisecond of data (a few segments at tens of Mbit/s).
# Reno (allowed in any namespace; at these round-trip times cubic behaves the same) with
# larger TSO bursts moves the same bytes in far fewer packets; rates are unchanged
# (tc shapes every link). DAMSELFLY_SWARM_CC and DAMSELFLY_SWARM_TSO_SEGS override them.
SYSCTLS = {
    "net.ipv4.tcp_congestion_control": os.environ.get("DAMSELFLY_SWARM_CC", "reno"),
    "net.ipv4.tcp_min_tso_segs": os.environ.get("DAMSELFLY_SWARM_TSO_SEGS", "44"),
    # A piece connection idles between pieces; by default the next piece then starts over
    # from the initial window. Keeping the window is the usual tuning for such reuse.
    "net.ipv4.tcp_slow_start_after_idle": os.environ.get("DAMSELFLY_SWARM_SSAI", "0"),
}
QUEUE_SECONDS = 0.03
# Every link's MTU. 1500 by default (the BitTorrent baseline's); 9000, as in many data centres
# (an AWS VPC's default is 9001), leaves 0.7% of a link to headers instead of 4.4%.
MTU = int(os.environ.get("DAMSELFLY_SWARM_MTU", "1500"))


def payload_share(mtu: int) -> float:
    """TCP payload over what tc counts for a full frame: the MTU less 52 bytes of IP and TCP
    headers (with timestamps), over the MTU plus the 14-byte Ethernet header."""
    return (mtu - 52) / (mtu + 14)


def unavailable() -> str | None:
    """None when namespaces and tc can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = "dfprobe"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _run(*args: str) -> None:
    done = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise DamselflyError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


@dataclass
class NetHost:
    name: str
    ns: str
    ip: str
    link: str  # the veth end on the bridge
    rate_bits: int  # 0: not shaped

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]


class Network:
    """A bridge and the namespaces on it; ``prefix`` keeps concurrent users apart."""

    def __init__(self, prefix: str = "dfsw", subnet: str = "10.77.0", mtu: int = MTU):
        if len(prefix) > 8:
            raise ValueError("prefix must be at most 8 characters (interface names are short)")
        if not 576 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is outside 576-65535")
        self.prefix = prefix
        self.subnet = subnet
        self.mtu = mtu
        self.bridge = f"{prefix}br"
        self.hosts: dict[str, NetHost] = {}
        self._next = 10
        self.sweep(prefix)
        _run("ip", "link", "add", self.bridge, "mtu", str(mtu), "type", "bridge")
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @staticmethod
    def sweep(prefix: str) -> None:
        """Remove the namespaces, processes and bridge of an earlier run with this prefix."""
        listed = subprocess.run(["ip", "-j", "netns", "list"], check=False, capture_output=True, text=True)
        names = [n["name"] for n in json.loads(listed.stdout or "[]")] if listed.returncode == 0 else []
        for ns in names:
            if ns.startswith(prefix + "-"):
                _kill_namespace(ns)
        # A deleted namespace frees its end of a veth pair later, in the kernel's own time;
        # deleting our end removes the pair now, so the next run can take the same names.
        links = subprocess.run(["ip", "-j", "link", "show"], check=False, capture_output=True, text=True)
        ours = [ln["ifname"] for ln in json.loads(links.stdout or "[]")] if links.returncode == 0 else []
        for name in ours:
            if name.startswith(prefix) and name[len(prefix) :].isdigit():  # add_host's f"{prefix}{idx}"
                subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", f"{prefix}br"], check=False, capture_output=True)

    def add_host(self, name: str, rate_bits: int = 0) -> NetHost:
        idx = self._next
        self._next += 1
        if idx > 250:
            raise DamselflyError("at most 240 hosts on one bridge")
        ns = f"{self.prefix}-{name}"
        link = f"{self.prefix}{idx}"
        inner = f"{link}p"
        ip = f"{self.subnet}.{idx}"
        _run("ip", "netns", "add", ns)
        host = NetHost(name, ns, ip, link, rate_bits)
        self.hosts[name] = host
        _run(
            "ip", "link", "add", link, "mtu", str(self.mtu), "type", "veth", "peer", "name", inner, "mtu", str(self.mtu)
        )
        _run("ip", "link", "set", inner, "netns", ns)
        _run("ip", "link", "set", link, "master", self.bridge)
        _run("ip", "link", "set", link, "up")
        in_ns = ["ip", "netns", "exec", ns]
        _run(*in_ns, "ip", "link", "set", inner, "name", "eth0")
        _run(*in_ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        _run(*in_ns, "ip", "link", "set", "eth0", "up")
        _run(*in_ns, "ip", "link", "set", "lo", "up")
        for key, value in SYSCTLS.items():
            _run(*in_ns, "sysctl", "-q", "-w", f"{key}={value}")
        if rate_bits:
            shape(rate_bits, "eth0", ns)  # what the host sends
            shape(rate_bits, link)  # what the host receives
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            _kill_namespace(host.ns)
            subprocess.run(["ip", "link", "del", host.link], check=False, capture_output=True)  # the pair, now
        self.hosts.clear()
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shape(rate_bits: int, dev: str, ns: str | None = None) -> None:
    """Cap what ``dev`` sends at ``rate_bits``: htb, small packets first, bulk over a short bfifo.

    Packets under 256 bytes (TCP ACKs, piece requests, control messages) have a class of
    their own that is served first, as a fair-queuing qdisc would serve them (this kernel
    has no fq_codel or sfq): otherwise a host whose upload is full delays the ACKs of
    everything it downloads by the whole queue, and its downloads slow down too.
    """
    pre = ["ip", "netns", "exec", ns] if ns else []

    def tc(args: str) -> None:
        _run(*pre, "tc", *args.split())

    rate = f"{rate_bits}bit"
    small = f"{max(rate_bits // 20, 8000)}bit"
    bulk = f"{max(rate_bits - rate_bits // 20, 8000)}bit"
    tc(f"qdisc replace dev {dev} root handle 1: htb default 20 r2q 100")
    tc(f"class add dev {dev} parent 1: classid 1:1 htb rate {rate} ceil {rate}")
    tc(f"class add dev {dev} parent 1:1 classid 1:10 htb rate {small} ceil {rate} prio 0")
    tc(f"class add dev {dev} parent 1:1 classid 1:20 htb rate {bulk} ceil {rate} prio 1")
    # an IPv4 packet whose total length is under 256 bytes goes to the first class
    tc(f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match u16 0x0000 0xff00 at 2 flowid 1:10")
    tc(f"qdisc add dev {dev} parent 1:10 pfifo limit 1000")
    # A queue of QUEUE_SECONDS at the rate, counted in bytes (veths pass 64 KiB GSO packets,
    # so a packet count would let seconds of data queue): what waits behind bulk data is short.
    limit = max(int(rate_bits / 8 * QUEUE_SECONDS), 64 * 1024)
    tc(f"qdisc add dev {dev} parent 1:20 bfifo limit {limit}")


def _kill_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True).stdout.split()
        if pids:
            time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def spawn(host: NetHost, args: list[str], env: dict[str, str], workdir: Path, name: str) -> cl.Proc:
    """Start ``python -m damselfly ARGS --ready-file ...`` in ``host``'s namespace."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    ready = workdir / "run" / f"{name}.json"
    ready.unlink(missing_ok=True)
    log = workdir / "logs" / f"{name}.log"
    popen = cl._spawn([*args, "--ready-file", str(ready)], env, log, prefix=host.argv())
    return cl.Proc(name, popen, ready, log)


# -- a swarm run ---------------------------------------------------------------------------

MiB = 1 << 20

# One host's plain HTTP download, started on a word from stdin so all begin at one instant.
_DIRECT = """
import os, sys, time, urllib.request
url = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
with urllib.request.urlopen(url, timeout=600) as resp:
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
t = os.times()
print(f"{time.time()} {n} {t.user + t.system} {t.system}", flush=True)
"""


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


@dataclass
class _Run:
    """One strategy's run in progress; times are seconds after the common start."""

    profile: Profile
    work: Path
    scheduler: str
    trace: Path | None
    procs: dict[str, cl.Proc]  # sched, seed, h1...: every process started, joiners too
    info: dict[str, dict[str, Any]]  # each daemon's ready file
    cpu_from: dict[str, CpuTimes] = field(default_factory=dict)  # when its part of the downloads began
    cpu_to: dict[str, CpuTimes] = field(default_factory=dict)  # at the last finish, or at its kill
    started: dict[str, float] = field(default_factory=dict)  # each peer's download request
    finished: dict[str, float] = field(default_factory=dict)
    daemon_started: dict[str, float] = field(default_factory=dict)  # the joiners'
    errors: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)


class SwarmLab:
    """The network, the origin and its file; one ``run`` per strategy, then ``close``."""

    def __init__(self, cfg: SwarmConfig, workdir: Path):
        self.cfg = cfg
        self.workdir = workdir
        self.net = Network(cfg.prefix, cfg.subnet, cfg.mtu)
        try:
            self.origin_host = self.net.add_host("origin", cfg.origin_rate_bits)
            self.sched_host = self.net.add_host("sched")
            self.seed_host = self.net.add_host("seed", cfg.seed_rate)
            self.peer_hosts = [self.net.add_host(name, cfg.rate_of(name)) for name in cfg.peer_names()]
            self._start_origin()
        except BaseException:
            self.net.close()
            raise

    def _start_origin(self) -> None:
        from damselfly.sandbox.demo import sha256_of
        from damselfly.sandbox.origin import make_file

        root = self.workdir / "origin"
        root.mkdir(parents=True, exist_ok=True)
        self.file = make_file(root / "blob", self.cfg.size)
        self.digest = "sha256:" + sha256_of(self.file)
        argv = self.origin_host.argv(
            sys.executable, "-m", "damselfly.sandbox.origin", "--dir", str(root), "--host", self.origin_host.ip
        )
        self.origin = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.origin.stdout is not None
        line = self.origin.stdout.readline()
        if not line:
            raise DamselflyError(f"the origin did not start (exit {self.origin.wait()})")
        self.origin_address = f"{self.origin_host.ip}:{json.loads(line)['port']}"
        self.url = f"http://{self.origin_address}/blob"

    def _origin_stats(self, reset: bool = False) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(
            f"http://{self.origin_address}/__stats" + ("/reset" if reset else ""), method="POST" if reset else "GET"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def close(self) -> None:
        if getattr(self, "origin", None) is not None:
            if self.origin.stdout is not None:
                self.origin.stdout.close()
            try:
                os.killpg(self.origin.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.origin.wait()
        self.net.close()

    def __enter__(self) -> SwarmLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ----------------------------------------------------------------------------------

    def _env(self, host: NetHost, extra: dict[str, str], declare_rates: bool = True) -> dict[str, str]:
        """The lab's plumbing (where the process lives, the origin's subnet allowed), then ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
        env.update(
            {
                "DAMSELFLY_LOG__LEVEL": self.cfg.log_level,
                "DAMSELFLY_HOST__IP": host.ip,
                "DAMSELFLY_HOST__HOSTNAME": host.name,
                "DAMSELFLY_DAEMON__LISTEN_IP": host.ip,
                "DAMSELFLY_SCHEDULER__LISTEN_IP": host.ip,
                "DAMSELFLY_PROXY__ENABLED": "false",
                "DAMSELFLY_PLUGINS__AUTOLOAD": "false",
                # the origin lives on the lab's private subnet, which the source policy refuses by default
                "DAMSELFLY_SECURITY__SOURCES__ALLOW_NETWORKS": json.dumps([f"{self.cfg.subnet}.0/24"]),
            }
        )
        if declare_rates and host.rate_bits:
            env["DAMSELFLY_HOST__MAX_TX_BANDWIDTH"] = str(host.rate_bits // 8)
            env["DAMSELFLY_HOST__MAX_RX_BANDWIDTH"] = str(host.rate_bits // 8)
        env.update(extra)
        return env

    def _spawn_daemon(self, host: NetHost, run: _Run) -> cl.Proc:
        is_seed = host is self.seed_host
        extra = dict(run.profile.daemon_env)
        if is_seed and run.profile.seed_env:
            extra.update(run.profile.seed_env)
        extra.update(
            {
                "DAMSELFLY_DAEMON__DATA_DIR": str(run.work / host.name),
                "DAMSELFLY_DAEMON__SCHEDULERS": json.dumps([run.scheduler]),
                "DAMSELFLY_DAEMON__SEED": "true" if is_seed else "false",
            }
        )
        if run.trace is not None:
            run.trace.mkdir(parents=True, exist_ok=True)
            extra["DAMSELFLY_PLUGINS__LOAD"] = json.dumps(["damselfly.testing.swarmtrace"])
            extra["DAMSELFLY_SWARM_TRACE"] = str(run.trace / f"{host.name}.jsonl")
        env = self._env(host, extra, run.profile.declare_rates)
        proc = spawn(host, ["daemon"], env, run.work, host.name)
        run.procs[host.name] = proc
        return proc

    def run(self, profile: Profile, *, verify: bool = True, trace: Path | None = None) -> dict[str, Any]:
        """Every host downloads the file at once through the swarm; their times, the origin's bytes, the CPU.

        With churn the late hosts' daemons start during the downloads, and each host starts its
        download once its daemon is ready and the scheduler knows it; the killed hosts' daemons
        get SIGKILL (their process group) mid-download and are reported as ``left``, outside
        the ratios. A staying host's failed download raises. ``verify`` checks each staying
        host's copy against the file's sha256 (``correct_hosts``).

        ``cpu_seconds_download`` is the CPU (user and system) the seed and peer daemons spent
        from the start of the downloads to the last finish (a joiner's from when its daemon
        was ready, a killed host's to its kill); ``cpu_seconds_per_gib`` is that over the GiB
        delivered to peers (those that finished, x F). ``cpu_seconds`` is every process's
        CPU over the whole run, startup included.
        """
        import asyncio

        cfg = self.cfg
        work = self.workdir / profile.name
        shutil.rmtree(work, ignore_errors=True)
        late = set(cfg.late_names())
        procs: dict[str, cl.Proc] = {}
        try:
            env = self._env(self.sched_host, profile.scheduler_env, profile.declare_rates)
            procs["sched"] = spawn(self.sched_host, ["scheduler"], env, work, "sched")
            scheduler = cl.wait_ready([procs["sched"]], READY_TIMEOUT)["sched"]["address"]
            run = _Run(profile, work, scheduler, trace, procs, {})
            daemons = [self._spawn_daemon(h, run) for h in [self.seed_host, *self.peer_hosts] if h.name not in late]
            run.info.update(cl.wait_ready(daemons, READY_TIMEOUT))
            asyncio.run(_wait_hosts(scheduler, len(daemons)))
            self._origin_stats(reset=True)
            self.started_at = time.time()
            asyncio.run(self._downloads(run))
            origin = self._origin_stats()
            staying = [n for n in cfg.peer_names() if n not in run.left]
            failed = {n: run.errors[n] for n in staying if n in run.errors}
            if failed:
                name, why = next(iter(failed.items()))
                raise DamselflyError(f"{profile.name}: {len(failed)} downloads failed: {name}: {why}")
            correct = asyncio.run(self._verify(run, staying)) if verify else []
            cpu = sum((run.cpu_to[n] if n in run.left else cpu_times(p.popen.pid)).total for n, p in procs.items())
            alive = [n for n in ["seed", *cfg.peer_names()] if n in run.info and n not in run.left]
            metrics = {n: run.info[n]["metrics"] for n in alive}
            uploaded = {n: scrape(m, "dragonfly_dfdaemon_upload_traffic_bytes_total") for n, m in metrics.items()}
            busy = sum(scrape(m, "dragonfly_dfdaemon_upload_busy_total") for m in metrics.values())
            readers = sum(
                scrape(m, "dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}') > 0
                for m in metrics.values()
            )
            announced, skipped = (
                sum(
                    scrape(m, "dragonfly_dfdaemon_sync_piece_total", f'{{outcome="{outcome}"}}')
                    for m in metrics.values()
                )
                for outcome in ("announced", "skipped")
            )
        finally:
            cl.stop_pids([p.popen.pid for p in procs.values()])
            for p in procs.values():
                p.popen.wait()
            if not os.environ.get("DAMSELFLY_KEEP_SWARM"):
                shutil.rmtree(work, ignore_errors=True)
        times = {n: run.finished[n] - run.started[n] for n in staying}
        summary = self._summary(times, origin["bytes"], uploaded)
        daemons = [n for n in run.cpu_from if n != "sched"]
        daemon_cpu = sum(run.cpu_to[n].total - run.cpu_from[n].total for n in daemons)
        summary["cpu_seconds"] = round(cpu, 1)
        summary["cpu_seconds_download"] = round(daemon_cpu, 2)
        summary["cpu_seconds_per_gib"] = round(daemon_cpu / (len(times) * cfg.size / GiB), 2)
        # the kernel's part (TCP, the veths, the bridge and tc run in the daemons' context here)
        daemon_sys = sum(run.cpu_to[n].system - run.cpu_from[n].system for n in daemons)
        summary["system_seconds_per_gib"] = round(daemon_sys / (len(times) * cfg.size / GiB), 2)
        summary["scheduler_cpu_seconds"] = round(run.cpu_to["sched"].total - run.cpu_from["sched"].total, 2)
        summary["correct_hosts"] = correct
        summary["busy_answers"] = int(busy)
        summary["source_readers"] = int(readers)  # staying daemons that read from the origin (shares: all)
        summary["sync_piece_messages"] = int(announced)
        summary["sync_pieces_skipped"] = int(skipped)  # the child's host had told us it holds them
        if cfg.late_hosts or cfg.killed_hosts:
            summary["joined"] = cfg.late_names()
            summary["left"] = run.left
            summary["joiners"] = {
                n: {
                    "daemon_started": round(run.daemon_started[n], 3),
                    "download_started": round(run.started[n], 3),
                    "seconds_from_common_start": round(run.finished[n], 3),
                    "seconds_from_own_start": round(run.finished[n] - run.started[n], 3),
                }
                for n in cfg.late_names()
                if n in run.finished
            }
        return summary

    async def _downloads(self, run: _Run) -> None:
        """The peers' downloads from one common start; late hosts join and killed hosts leave on time."""
        import asyncio

        from damselfly.sdk.client import Client

        cfg = self.cfg
        t_min = cfg.t_min()
        late = cfg.late_names()
        run.cpu_from = {n: cpu_times(p.popen.pid) for n, p in run.procs.items()}
        t0 = time.monotonic()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, t0 + fraction * t_min - time.monotonic()))

        async def download(name: str) -> None:
            run.started[name] = time.monotonic() - t0
            try:
                async with Client(run.info[name]["socket"]) as c:
                    await c.download(self.url, piece_length=cfg.piece_length)
                run.finished[name] = time.monotonic() - t0
            except DamselflyError as exc:
                run.errors[name] = str(exc)

        async def join(host: NetHost) -> None:
            await at(cfg.join_at)
            run.daemon_started[host.name] = time.monotonic() - t0
            proc = self._spawn_daemon(host, run)
            run.info.update(await asyncio.to_thread(cl.wait_ready, [proc], READY_TIMEOUT))
            await _wait_hosts(run.scheduler, ips=[host.ip])
            run.cpu_from[host.name] = cpu_times(proc.popen.pid)
            await download(host.name)

        tasks = {h.name: asyncio.create_task(download(h.name)) for h in self.peer_hosts if h.name not in late}

        async def leave() -> None:
            await at(cfg.kill_at)
            for name in cfg.killed_names():
                pid = run.procs[name].popen.pid
                run.cpu_to[name] = cpu_times(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                tasks[name].cancel()  # its client, before it sees the socket close
                run.left.append(name)

        others = [join(h) for h in self.peer_hosts if h.name in late]
        if cfg.killed_hosts:
            others.append(leave())
        results = await asyncio.gather(*tasks.values(), *others, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        for name, proc in run.procs.items():
            run.cpu_to.setdefault(name, cpu_times(proc.popen.pid))

    def _summary(self, times: dict[str, float], origin_bytes: int, uploaded: dict[str, float]) -> dict[str, Any]:
        """Ratios of each host's time (from its own start) to T_min and to its own bound, by host order."""
        cfg = self.cfg
        t_min = cfg.t_min()
        f = cfg.size
        names = [n for n in cfg.peer_names() if n in times]
        secs = [times[n] for n in names]
        own = [times[n] / cfg.own_t_min(n) for n in names]
        out: dict[str, Any] = {
            "seconds": [round(t, 3) for t in secs],
            "p50_seconds": round(quantile(secs, 0.5), 3),
            "max_seconds": round(max(secs), 3),
            "p50_ratio": round(quantile(secs, 0.5) / t_min, 3),
            "p90_ratio": round(quantile(secs, 0.9) / t_min, 3),
            "max_ratio": round(max(secs) / t_min, 3),
            "p50_own_ratio": round(quantile(own, 0.5), 3),
            "max_own_ratio": round(max(own), 3),
            "origin_ratio": round(origin_bytes / f, 3),
            "seed_upload_ratio": round(uploaded.get("seed", 0.0) / f, 3),
        }
        classes = cfg.classes()
        if len(classes) > 1:
            out["classes"] = {}
            for label, members in classes.items():
                mine = [n for n in members if n in times]
                if mine:
                    out["classes"][label] = {
                        "hosts": len(mine),
                        "rate_bits": cfg.rate_of(mine[0]),
                        "p50_ratio": round(quantile([times[n] for n in mine], 0.5) / t_min, 3),
                        "p50_own_ratio": round(quantile([times[n] / cfg.own_t_min(n) for n in mine], 0.5), 3),
                    }
        return out

    async def _verify(self, run: _Run, names: list[str]) -> list[str]:
        """Each host's copy against the file's sha256 (a local hit: the daemon checks what it stored)."""
        from damselfly.sdk.client import Client

        verified = []
        for name in names:
            async with Client(run.info[name]["socket"]) as c:
                await c.download(self.url, piece_length=self.cfg.piece_length, digest=self.digest)
            verified.append(name)
        return verified

    def direct(self) -> dict[str, Any]:
        """The same hosts, each fetching the whole file straight from the origin, all at once."""
        self._origin_stats(reset=True)
        procs = {
            h.name: subprocess.Popen(
                h.argv(sys.executable, "-c", _DIRECT, self.url),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for h in self.peer_hosts
        }
        try:
            for p in procs.values():
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise DamselflyError(f"a direct download did not start: {p.stderr.read() if p.stderr else ''}")
            origin_cpu = cpu_times(self.origin.pid).total
            t0 = time.time()
            for p in procs.values():
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            times = {}
            cpu = system = 0.0
            for name, p in procs.items():
                out, err = p.communicate(timeout=3600)
                if p.returncode != 0:
                    raise DamselflyError(f"a direct download failed: {err.strip().splitlines()[-1:]}")
                end, n, used, kernel = out.split()
                if int(n) != self.cfg.size:
                    raise DamselflyError(f"a direct download got {n} bytes, not {self.cfg.size}")
                times[name] = float(end) - t0
                cpu, system = cpu + float(used), system + float(kernel)
            origin_cpu = cpu_times(self.origin.pid).total - origin_cpu
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        summary = self._summary(times, self._origin_stats()["bytes"], {})
        # what the plain clients spent receiving (start-up included): the floor of a download's cost
        # on these emulated links, whose kernel work (veth, bridge, tc) runs in the processes' context
        gib = len(times) * self.cfg.size / GiB
        summary["cpu_seconds_per_gib"] = round(cpu / gib, 2)
        summary["system_seconds_per_gib"] = round(system / gib, 2)
        # and the origin's sending them: with the clients', what moving the bytes costs on these links
        summary["origin_cpu_seconds_per_gib"] = round(origin_cpu / gib, 2)
        return summary


async def _wait_hosts(scheduler: str, count: int = 0, ips: Sequence[str] = (), timeout: float = 30.0) -> None:
    """Until the scheduler has heard AnnounceHost from ``count`` daemons, and from one at each of ``ips``."""
    import asyncio

    import grpc
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(scheduler) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        while True:
            hosts = (await stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5)).hosts
            if len(hosts) >= count and set(ips) <= {h.ip for h in hosts}:
                return
            if time.monotonic() > deadline:
                raise DamselflyError(
                    f"the scheduler knows {len(hosts)} of {count} hosts ({', '.join(ips)}) after {timeout:.0f}s"
                )
            await asyncio.sleep(0.1)


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
