"""One peer fetches a file from a seed on loopback: throughput, daemons' CPU and peak RSS.

    python benchmarks/seed_throughput.py [--size 1GiB] [--runs 3] [--json]
    python benchmarks/seed_throughput.py --variants crc32,sha256,blake3,tls-crc32,tls-sha256 [--json]
    python benchmarks/seed_throughput.py --security --warmup 1 [--json]   # the five variants above
    python benchmarks/seed_throughput.py --variants default,nosync --size 512MiB --runs 3   # the fdatasync cost

The seed first fetches the file from a local origin (not timed); then one peer
downloads it from the seed through the scheduler, Vortex over TCP, the piece digest
checked on every piece and the disk storage, as in production. RSS of the daemons
is sampled every 20 ms during the transfers; their CPU time is summed over each
timed download: ``cpu_s_per_gb`` each, and ``cpu_seconds_per_gib`` the two together per GiB
the peer got (as ``swarm.py`` reports per profile).

``--variants`` runs several configurations in one invocation: ``default`` (whatever the
configuration's defaults are), a piece digest (``crc32``, ``sha256``, ``blake3``:
``security.piece_digest`` on every process), or ``tls-DIGEST``: the same with mutual
TLS everywhere (a fresh CA and certificates in the run's temp dir, ``security.tls``
set on every process), so Vortex over TCP runs over TLS; or ``nosync``: the daemons' disk
storage with ``sync`` off (no fdatasync before a metadata save), to measure what the
durability costs. Each variant gets its own
cluster, all up at once; the timed downloads then go in rounds, one of each variant
per round, so the machine's drift falls on all of them alike. ``--warmup N`` runs N
untimed downloads of each first. It prints one JSON object (``--json``) or a table,
with each variant's median throughput relative to the first variant's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil

from damselfly.core.units import format_size, parse_size
from damselfly.sandbox import cluster as cl
from damselfly.sdk.client import Client
from damselfly.testing import Cluster, OriginProcess

GIB = 1 << 30
DIGESTS = ("crc32", "sha256", "blake3")
SECURITY_VARIANTS = ("crc32", "sha256", "blake3", "tls-crc32", "tls-sha256")
NOSYNC = "nosync"  # the default, with the disk storage's fdatasync off


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], interval: float = 0.02):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for name, p in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)
                except psutil.Error:
                    pass
            self.stop_event.wait(self.interval)


async def _download(socket: str, url: str, output: Path | None, delete_after: bool = False) -> float:
    async with Client(socket) as c:
        r = await c.download(url, output)
        if r.peer_bytes + r.source_bytes != r.content_length:
            raise SystemExit(f"expected a full transfer, got {r}")
        if delete_after:
            await c.delete_task(r.task_id)
    return r.seconds


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def parse_variant(name: str) -> tuple[str | None, bool]:
    """A variant's piece digest (None: the default) and whether it runs with TLS; SystemExit if unknown."""
    if name == NOSYNC:
        return None, False
    tls = name.startswith("tls")
    digest = name.removeprefix("tls").removeprefix("-") or None
    if digest == "default":
        digest = None
    if digest is not None and digest not in DIGESTS:
        raise SystemExit(f"unknown variant {name!r}: use default, {', '.join(DIGESTS)}, or tls-DIGEST")
    return digest, tls


def _blake3_missing() -> str | None:
    try:
        import blake3  # noqa: F401
    except ImportError:
        return "the blake3 package is not installed"
    return None


class Variant:
    """One configuration's cluster (scheduler, seed, peer1), its seed filled from the origin."""

    def __init__(self, root: Path, origin: OriginProcess, url: str, size: int, name: str, args: Any):
        self.name, self.url, self.size = name, url, size
        self.digest, self.tls = parse_variant(name)
        env: dict[str, str] = dict(setting.split("=", 1) for setting in args.env)
        if self.digest is not None:
            env["DAMSELFLY_SECURITY__PIECE_DIGEST"] = self.digest
        if name == NOSYNC:
            env["DAMSELFLY_DAEMON__STORAGE"] = json.dumps({"type": "disk", "sync": False})
        peer_env: dict[int, dict[str, str]] = {}
        if args.peer_storage == "memory":
            peer_env[1] = {"DAMSELFLY_DAEMON__STORAGE": json.dumps({"type": "memory", "capacity": size + (1 << 20)})}
        self.directory = root / f"cluster-{name}"
        info, procs = cl.start(self.directory, 1, env=env, peer_env=peer_env, tls=self.tls)
        self.cluster = Cluster(self.directory, info, env, peer_env, procs)
        self.seed, self.peer = self.cluster.daemon("seed"), self.cluster.daemon("peer1")
        origin.reset()
        self.fill_seconds = asyncio.run(_download(self.seed["socket"], url, None))
        self.origin_bytes = origin.stats()["bytes"]
        self.procs = {"seed": psutil.Process(self.seed["pid"]), "peer": psutil.Process(self.peer["pid"])}
        self.rss_before = {k: p.memory_info().rss for k, p in self.procs.items()}
        self.runs: list[float] = []
        self.cpu = dict.fromkeys(self.procs, 0.0)

    def download(self, keep: bool, timed: bool = True) -> None:
        before = {k: _cpu(p) for k, p in self.procs.items()}
        seconds = asyncio.run(_download(self.peer["socket"], self.url, None, delete_after=not keep))
        if timed:
            self.runs.append(seconds)
            for k, p in self.procs.items():
                self.cpu[k] += _cpu(p) - before[k]

    def result(self, peak: dict[str, int]) -> dict[str, Any]:
        seconds = statistics.median(self.runs)
        moved = self.size * len(self.runs) / 1e9
        return {
            "variant": self.name,
            "piece_digest": self.digest or "default",
            "tls": self.tls,
            "seconds": round(seconds, 3),
            "mb_per_s": round(self.size / seconds / 1e6, 1),
            "runs_mb_per_s": [round(self.size / r / 1e6, 1) for r in self.runs],
            "seed_fill_seconds": round(self.fill_seconds, 3),
            "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in peak.items()},
            "rss_before_mb": {k: round(v / 1e6, 1) for k, v in self.rss_before.items()},
            "origin_bytes": self.origin_bytes,
            # CPU seconds each daemon spent per GB moved (user + system, all its threads): what the transfer costs
            "cpu_s_per_gb": {k: round(v / moved, 2) for k, v in self.cpu.items()},
            # the seed's and the peer's CPU seconds together over the timed transfers, per GiB the peer
            # got: the figure benchmarks/swarm.py reports per profile
            "cpu_seconds_per_gib": round(sum(self.cpu.values()) / (self.size * len(self.runs) / GIB), 3),
            "peer_warnings": sum(
                1 for line in self.cluster.log("peer1").splitlines() if "WARNING" in line or "ERROR" in line
            ),
        }

    def down(self) -> None:
        self.cluster.down()
        shutil.rmtree(self.directory, ignore_errors=True)


def measure(root: Path, origin: OriginProcess, url: str, size: int, names: list[str], args: Any) -> list[dict]:
    """Every variant's cluster up at once, then the timed downloads in rounds (one of each variant per
    round), so that the machine's drift (other load, its speed of the moment) falls on all of them alike."""
    variants: list[Variant] = []
    try:
        for name in names:
            variants.append(Variant(root, origin, url, size, name, args))
        os.sync()  # the origin's and the seeds' writes are not the peers' to pay for
        for _ in range(args.warmup):
            for v in variants:
                v.download(keep=False, timed=False)
        sampler = RssSampler({f"{v.name}/{k}": p.pid for v in variants for k, p in v.procs.items()})
        sampler.start()
        for i in range(args.runs):
            os.sync()  # each round starts with no dirty page cache: no writeback of the last one's files meanwhile
            for v in variants:
                v.download(keep=i == args.runs - 1)
        sampler.stop_event.set()
        sampler.join()
        return [v.result({k: sampler.peak[f"{v.name}/{k}"] for k in v.procs}) for v in variants]
    finally:
        for v in variants:
            v.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=5, help="peer downloads per variant, the task deleted between them")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--peer-storage", default="disk", choices=["disk", "memory"], help="the fetching peer's storage")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="DAMSELFLY_KEY=VALUE",
        help="a setting for every process of every variant (repeatable), e.g. DAMSELFLY_DAEMON__UPLOAD_SLOTS=0",
    )
    ap.add_argument(
        "--variants",
        default="default",
        help="comma-separated: default, nosync, crc32, sha256, blake3, tls-crc32, tls-sha256, tls-blake3 (see above)",
    )
    ap.add_argument("--security", action="store_true", help=f"the variants {','.join(SECURITY_VARIANTS)}")
    ap.add_argument(
        "--warmup", type=int, default=0, help="untimed peer downloads per variant first (the VM's cold first touch)"
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    names = list(SECURITY_VARIANTS) if args.security else [v.strip() for v in args.variants.split(",") if v.strip()]
    skipped: dict[str, str] = {}
    for name in list(names):
        if parse_variant(name)[0] == "blake3" and (why := _blake3_missing()):
            skipped[name] = why
            names.remove(name)
    if not names:
        raise SystemExit("no variant to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    root = Path(args.dir or tempfile.mkdtemp(prefix="damselfly-bench-"))
    origin = OriginProcess(root / "origin")
    load_before = os.getloadavg()[0]
    try:
        origin.make("big.bin", size)
        results = measure(root, origin, origin.url("big.bin"), size, names, args)
    finally:
        origin.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = results[0]["mb_per_s"]
    for r in results:
        r["relative_to_first"] = round(r["mb_per_s"] / base, 3)
    report: dict[str, Any] = {
        "benchmark": "seed_throughput",
        "file_size": size,
        "peer_storage": args.peer_storage,
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cpus, Python {platform.python_version()}",
        # the 1-minute load average before and after: other work on the machine shows here
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "variants": results,
        "skipped": skipped,
    }
    if len(results) == 1:  # one variant: its figures at the top, as before
        report.update({k: v for k, v in results[0].items() if k not in ("variant", "relative_to_first")})
    if args.json:
        print(json.dumps(report))
        return
    rounds = f"{args.runs} rounds" + (f" after {args.warmup} untimed" if args.warmup else "")
    print(f"one peer <- seed on loopback, {format_size(size)}, {rounds} ({report['machine']})")
    print(f"  load average before / after: {report['load_average'][0]} / {report['load_average'][1]}")
    head = f"  {'variant':<12}{'MB/s (median)':>15}{'vs first':>10}  {'each run (MB/s)':<30}"
    print(head + f"{'CPU s/GB seed/peer':>20}{'CPU s/GiB':>11}{'peak RSS seed/peer (MB)':>26}")
    for r in results:
        runs = ", ".join(str(x) for x in r["runs_mb_per_s"])
        cpu = f"{r['cpu_s_per_gb']['seed']} / {r['cpu_s_per_gb']['peer']}"
        rss = f"{r['peak_rss_mb']['seed']} / {r['peak_rss_mb']['peer']}"
        line = f"  {r['variant']:<12}{r['mb_per_s']:>15}{r['relative_to_first']:>10.2f}  {runs:<30}"
        print(line + f"{cpu:>20}{r['cpu_seconds_per_gib']:>11}{rss:>26}")
    for name, why in skipped.items():
        print(f"  {name:<12}skipped: {why}")
    print(f"  origin bytes per seed fill: {', '.join(str(r['origin_bytes']) for r in results)}")
    print(f"  json: {json.dumps(report)}")


if __name__ == "__main__":
    main()
