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
import time
from dataclasses import dataclass
from pathlib import Path

from damselfly.core.errors import DamselflyError
from damselfly.sandbox import cluster as cl

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
