"""8 runtimes pull one 4-layer image at once: through the swarm vs straight from a rate-limited registry.

    python benchmarks/registry_pull.py [--peers 8] [--size 256MiB] [--rate 50MB/s] [--json]

A real registry (docker-registry) holds an image of four layers of random bytes
(``--size`` in all), built with umoci and pushed with skopeo. What the registry can
send is capped at ``--rate``, all connections together, as its uplink would be: by
default it runs in a network namespace whose veth ``tc tbf`` shapes (the kernel's
work, so a busy CPU does not lower the cap); ``--shaper forwarder`` puts a Python
forwarder on loopback in front of it instead. Then, in one run:

- ``direct``: ``--peers`` skopeo pulls at once from the registry;
- ``swarm``: a scheduler, a seed and ``--peers`` daemons; each skopeo pull goes
  through its own daemon's proxy (a ``registries.conf`` mirror, as
  ``damselfly runtime-config skopeo`` prints it).

For each: the blob bytes the registry sent (its own access log) and the time of the
slowest pull. Targets: swarm registry bytes = the image size; slowest swarm pull at
most 0.4 x the direct one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from damselfly.core.units import format_size, parse_rate, parse_size
from damselfly.testing import registry as reg
from damselfly.testing import start_cluster, swarmconfig


class ShapedNamespace:
    """The registry in a network namespace of its own, behind a veth whose egress ``tc tbf`` caps at ``rate``.

    The kernel does the shaping, so the cap holds however busy the CPUs are (a
    forwarder written in Python slows down with the machine it measures). Needs
    root; traffic stays on this host (10.203.0.0/30, a link made here).
    """

    NS, HOST_IF, NS_IF = "dfbench", "dfbench0", "dfbench1"
    HOST_IP, NS_IP = "10.203.0.1", "10.203.0.2"

    def __init__(self, rate: int):
        self.rate = rate

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def __enter__(self) -> ShapedNamespace:
        self.__exit__()
        self._ip("netns", "add", self.NS)
        self._ip("link", "add", self.HOST_IF, "type", "veth", "peer", "name", self.NS_IF)
        self._ip("link", "set", self.NS_IF, "netns", self.NS)
        self._ip("addr", "add", f"{self.HOST_IP}/30", "dev", self.HOST_IF)
        self._ip("link", "set", self.HOST_IF, "up")
        ns = ["netns", "exec", self.NS, "ip"]
        self._ip(*ns, "addr", "add", f"{self.NS_IP}/30", "dev", self.NS_IF)
        self._ip(*ns, "link", "set", self.NS_IF, "up")
        self._ip(*ns, "link", "set", "lo", "up")
        bits = self.rate * 8
        tbf = [
            "qdisc",
            "add",
            "dev",
            self.NS_IF,
            "root",
            "tbf",
            "rate",
            f"{bits}bit",
            "burst",
            "256kb",
            "latency",
            "100ms",
        ]
        subprocess.run(["ip", "netns", "exec", self.NS, "tc", *tbf], check=True, capture_output=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.NS], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.HOST_IF], check=False, capture_output=True)


def _pulls(work: Path, reference: str, mirrors: list[str | None]) -> float:
    """Run one skopeo pull per entry at once (through that mirror, or direct); the slowest one's seconds."""

    def one(i: int, mirror: str | None) -> float:
        t0 = time.perf_counter()
        if mirror is None:
            out = work / f"direct-{i}"
            cmd = ["skopeo", "copy", "--src-tls-verify=false", f"docker://{reference}", f"oci:{out}:x"]
            reg._runner()(cmd)
        else:
            reg.skopeo_pull(work, reference, mirror, f"swarm-{i}")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(len(mirrors)) as pool:
        return max(pool.map(one, range(len(mirrors)), mirrors))


def _cpu_seconds(pid: int, which: str = "both") -> float:
    """User, system or both CPU seconds process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return {"user": user, "system": system, "both": user + system}[which] / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--size", default="256MiB", help="All four layers together.")
    ap.add_argument("--rate", default="50MB/s", help="What the registry can send, all pulls together.")
    ap.add_argument(
        "--shaper",
        choices=["netns", "forwarder"],
        default="netns",
        help="netns: the registry in a namespace behind tc tbf (root); forwarder: a Python forwarder on loopback",
    )
    ap.add_argument(
        "--profile",
        default="default",
        help="scheduling settings of the swarm, as benchmarks/swarm.py names them (default, swarm, ...)",
    )
    ap.add_argument("--skip-direct", action="store_true", help="Only the swarm pulls (for profiling; no ratio).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if reg.missing_tools():
        raise SystemExit(f"needs {', '.join(reg.missing_tools())} (scripts/setup.sh installs them)")
    size, rate = parse_size(args.size), parse_rate(args.rate)
    work = Path(tempfile.mkdtemp(prefix="damselfly-bench-registry-"))
    shaped = ShapedNamespace(rate) if args.shaper == "netns" else None
    if shaped is not None:
        shaped.__enter__()
    registry = reg.Registry(work / "registry")
    try:
        if shaped is not None:
            registry.start(netns=shaped.NS, ip=shaped.NS_IP)
            address = registry.address
        else:
            registry.start()
            limiter = reg.Limiter(("127.0.0.1", registry.port), rate)
            limiter.start()
            limiter.ready.wait(10)
            address = f"127.0.0.1:{limiter.port}"
        image = reg.build_and_push(work / "image", registry, "bench/app", [size // 4] * 4)
        reference = f"{address}/bench/app:v1"
        image_bytes = sum(image.blobs.values())
        results = {}

        if not args.skip_direct:
            before = sum(registry.blob_bytes().values())
            seconds = _pulls(work, reference, [None] * args.peers)
            results["direct"] = {"registry_bytes": sum(registry.blob_bytes().values()) - before, "slowest_s": seconds}

        env = {"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{address}"}
        profile = swarmconfig.PROFILES[args.profile]
        env = {**env, **profile.scheduler_env, **profile.daemon_env}
        cluster = start_cluster(work / "cluster", args.peers, env=env, peer_env={0: dict(profile.seed_env or {})})
        try:
            proxies = [d["proxy"] for d in cluster.daemons if not d["seed"]]
            before = sum(registry.blob_bytes().values())
            clients0 = _children_cpu()
            seconds = _pulls(work, reference, proxies)
            results["swarm"] = {
                "registry_bytes": sum(registry.blob_bytes().values()) - before,
                "slowest_s": seconds,
                "daemons_cpu_s": round(sum(_cpu_seconds(int(d["pid"])) for d in cluster.daemons), 1),
                "daemons_system_cpu_s": round(sum(_cpu_seconds(int(d["pid"]), "system") for d in cluster.daemons), 1),
                "seed_cpu_s": round(sum(_cpu_seconds(int(d["pid"])) for d in cluster.daemons if d["seed"]), 1),
                "clients_cpu_s": round(_children_cpu() - clients0, 1),
            }
        finally:
            cluster.down()
    finally:
        registry.stop()
        if shaped is not None:
            shaped.__exit__()
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "machine": f"{os.cpu_count()} cpus, Python {platform.python_version()}",
        "peers": args.peers,
        "image_bytes": image_bytes,
        "layers": len(image.blobs) - 1,
        "registry_rate": rate,
        "shaper": args.shaper,
        **results,
    }
    if "direct" in results:
        out["slowest_ratio"] = round(results["swarm"]["slowest_s"] / results["direct"]["slowest_s"], 3)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'':8}{'registry sent':>16}{'x image':>9}{'slowest pull':>14}")
    for name, r in results.items():
        print(
            f"{name:8}{format_size(r['registry_bytes']):>16}{r['registry_bytes'] / image_bytes:>9.2f}"
            f"{r['slowest_s']:>13.1f}s"
        )
    if "slowest_ratio" in out:
        print(f"slowest swarm pull / slowest direct pull = {out['slowest_ratio']} (target <= 0.4)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
