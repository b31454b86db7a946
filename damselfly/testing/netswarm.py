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
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damselfly import cluster as cl
from damselfly.core.errors import DamselflyError
from damselfly.demo import scrape

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
import sys, time, urllib.request
url = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
with urllib.request.urlopen(url, timeout=600) as resp:
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
print(f"{time.time()} {n}", flush=True)
"""


@dataclass
class Profile:
    """A strategy under test: the settings of the scheduler, the seed and the peers."""

    name: str
    scheduler_env: dict[str, str]
    daemon_env: dict[str, str]
    seed_env: dict[str, str] | None = None


@dataclass
class SwarmConfig:
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

    @property
    def seed_rate(self) -> int:
        return self.seed_rate_bits or self.rate_bits

    def t_min(self) -> float:
        """Kumar and Ross's bound with the seed as the server (it must also get F from the origin)."""
        bits = self.size * 8
        n = self.hosts
        return max(
            bits / min(self.origin_rate_bits, self.seed_rate),  # the seed receives F
            bits / self.seed_rate,  # F / u_s
            bits / self.rate_bits,  # F / d_min
            n * bits / (self.seed_rate + n * self.rate_bits),  # N F / (u_s + sum u_i)
        )


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
            self.peer_hosts = [self.net.add_host(f"h{i}", cfg.rate_bits) for i in range(1, cfg.hosts + 1)]
            self._start_origin()
        except BaseException:
            self.net.close()
            raise

    def _start_origin(self) -> None:
        from damselfly.demo import sha256_of
        from damselfly.origin import make_file

        root = self.workdir / "origin"
        root.mkdir(parents=True, exist_ok=True)
        self.file = make_file(root / "blob", self.cfg.size)
        self.digest = "sha256:" + sha256_of(self.file)
        argv = self.origin_host.argv(
            sys.executable, "-m", "damselfly.origin", "--dir", str(root), "--host", self.origin_host.ip
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

    def _env(self, host: NetHost, extra: dict[str, str]) -> dict[str, str]:
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
        if host.rate_bits:
            env["DAMSELFLY_HOST__MAX_TX_BANDWIDTH"] = str(host.rate_bits // 8)
            env["DAMSELFLY_HOST__MAX_RX_BANDWIDTH"] = str(host.rate_bits // 8)
        env.update(extra)
        return env

    def run(self, profile: Profile, *, verify: bool = True, trace: Path | None = None) -> dict[str, Any]:
        """Every host downloads the file at once through the swarm; their times and the origin's bytes."""
        import asyncio

        work = self.workdir / profile.name
        shutil.rmtree(work, ignore_errors=True)
        services: list[cl.Proc] = []
        try:
            env = self._env(self.sched_host, profile.scheduler_env)
            services.append(spawn(self.sched_host, ["scheduler"], env, work, "sched"))
            scheduler = cl.wait_ready(services, READY_TIMEOUT)["sched"]["address"]
            daemons = []
            for host in [self.seed_host, *self.peer_hosts]:
                is_seed = host is self.seed_host
                extra = dict(profile.daemon_env)
                if is_seed and profile.seed_env:
                    extra.update(profile.seed_env)
                extra.update(
                    {
                        "DAMSELFLY_DAEMON__DATA_DIR": str(work / host.name),
                        "DAMSELFLY_DAEMON__SCHEDULERS": json.dumps([scheduler]),
                        "DAMSELFLY_DAEMON__SEED": "true" if is_seed else "false",
                    }
                )
                if trace is not None:
                    trace.mkdir(parents=True, exist_ok=True)
                    extra["DAMSELFLY_PLUGINS__LOAD"] = json.dumps(["damselfly.testing.swarmtrace"])
                    extra["DAMSELFLY_SWARM_TRACE"] = str(trace / f"{host.name}.jsonl")
                daemons.append(spawn(host, ["daemon"], self._env(host, extra), work, host.name))
            services += daemons
            info = cl.wait_ready(daemons, READY_TIMEOUT)
            sockets = [info[d.name]["socket"] for d in daemons[1:]]
            asyncio.run(_wait_hosts(scheduler, len(daemons)))
            self._origin_stats(reset=True)
            self.started_at = time.time()
            times, errors = asyncio.run(self._download_all(sockets))
            origin = self._origin_stats()
            if errors:
                raise DamselflyError(f"{profile.name}: {len(errors)} downloads failed: {errors[0]}")
            if verify:
                asyncio.run(self._verify(sockets))
            cpu = sum(_cpu_seconds(s.popen.pid) for s in services)
            uploaded = {
                d.name: scrape(info[d.name]["metrics"], "dragonfly_dfdaemon_upload_traffic_bytes_total")
                for d in daemons
            }
            busy = sum(scrape(info[d.name]["metrics"], "dragonfly_dfdaemon_upload_busy_total") for d in daemons)
            readers = sum(
                scrape(
                    info[d.name]["metrics"],
                    "dragonfly_dfdaemon_download_traffic_bytes_total",
                    '{traffic_type="back_to_source"}',
                )
                > 0
                for d in daemons
            )
            announced, skipped = (
                sum(
                    scrape(info[d.name]["metrics"], "dragonfly_dfdaemon_sync_piece_total", f'{{outcome="{outcome}"}}')
                    for d in daemons
                )
                for outcome in ("announced", "skipped")
            )
        finally:
            cl.stop_pids([p.popen.pid for p in services])
            for p in services:
                p.popen.wait()
            if not os.environ.get("DAMSELFLY_KEEP_SWARM"):
                shutil.rmtree(work, ignore_errors=True)
        summary = self._summary(times, origin["bytes"], uploaded)
        summary["cpu_seconds"] = round(cpu, 1)
        summary["busy_answers"] = int(busy)
        summary["source_readers"] = int(readers)  # daemons that read from the origin (shares: all)
        summary["sync_piece_messages"] = int(announced)
        summary["sync_pieces_skipped"] = int(skipped)  # the child's host had told us it holds them
        return summary

    def _summary(self, times: list[float], origin_bytes: int, uploaded: dict[str, float]) -> dict[str, Any]:
        t_min = self.cfg.t_min()
        f = self.cfg.size
        return {
            "seconds": [round(t, 3) for t in times],
            "p50_seconds": round(quantile(times, 0.5), 3),
            "max_seconds": round(max(times), 3),
            "p50_ratio": round(quantile(times, 0.5) / t_min, 3),
            "p90_ratio": round(quantile(times, 0.9) / t_min, 3),
            "max_ratio": round(max(times) / t_min, 3),
            "origin_ratio": round(origin_bytes / f, 3),
            "seed_upload_ratio": round(uploaded.get("seed", 0.0) / f, 3),
        }

    async def _download_all(self, sockets: list[str]) -> tuple[list[float], list[str]]:
        import asyncio

        from damselfly.client import Client

        t0 = time.monotonic()
        times: list[float] = []
        errors: list[str] = []

        async def one(sock: str) -> None:
            async with Client(sock) as c:
                try:
                    await c.download(self.url, piece_length=self.cfg.piece_length)
                    times.append(time.monotonic() - t0)
                except DamselflyError as exc:
                    errors.append(str(exc))

        await asyncio.gather(*(one(s) for s in sockets))
        return times, errors

    async def _verify(self, sockets: list[str]) -> None:
        """Each host's copy against the file's sha256 (a local hit: the daemon checks what it stored)."""
        from damselfly.client import Client

        for sock in sockets:
            async with Client(sock) as c:
                await c.download(self.url, piece_length=self.cfg.piece_length, digest=self.digest)

    def direct(self) -> dict[str, Any]:
        """The same hosts, each fetching the whole file straight from the origin, all at once."""
        self._origin_stats(reset=True)
        procs = [
            subprocess.Popen(
                h.argv(sys.executable, "-c", _DIRECT, self.url),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for h in self.peer_hosts
        ]
        try:
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise DamselflyError(f"a direct download did not start: {p.stderr.read() if p.stderr else ''}")
            t0 = time.time()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            times = []
            for p in procs:
                out, err = p.communicate(timeout=3600)
                if p.returncode != 0:
                    raise DamselflyError(f"a direct download failed: {err.strip().splitlines()[-1:]}")
                end, n = out.split()
                if int(n) != self.cfg.size:
                    raise DamselflyError(f"a direct download got {n} bytes, not {self.cfg.size}")
                times.append(float(end) - t0)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        return self._summary(times, self._origin_stats()["bytes"], {})


async def _wait_hosts(scheduler: str, count: int, timeout: float = 30.0) -> None:
    """Until the scheduler has heard AnnounceHost from ``count`` daemons."""
    import asyncio

    import grpc
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(scheduler) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        while True:
            hosts = (await stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5)).hosts
            if len(hosts) >= count:
                return
            if time.monotonic() > deadline:
                raise DamselflyError(f"the scheduler knows {len(hosts)} of {count} hosts after {timeout:.0f}s")
            await asyncio.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its children (``ip netns exec`` execs, so it is the service)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    except psutil.Error:
        return 0.0


def _strategy(name: str) -> dict[str, str]:
    return {"DAMSELFLY_SCHEDULER__STRATEGY": name}


# What each strategy under test sets in the scheduler, the peers and the seed. ``default``,
# ``random`` and ``locality`` keep the daemons' defaults (upstream's behaviour: sequential
# pieces, a DAG, a seed that answers every request); ``swarm`` is the combination built to
# approach the bound.
PROFILES: dict[str, Profile] = {
    "default": Profile("default", _strategy("default"), {}),
    "random": Profile("random", _strategy("random"), {}),
    "locality": Profile("locality", _strategy("locality"), {}),
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
