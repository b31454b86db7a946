"""One peer fetches a file from a seed on loopback: throughput and daemons' peak RSS.

    python benchmarks/seed_throughput.py [--size 1GiB] [--json]

The seed first fetches the file from a local origin (not timed); then one peer
downloads it from the seed through the scheduler, Vortex over TCP, crc32 on
every piece and the disk storage, as in production. RSS of both daemon
processes is sampled every 20 ms during the transfer.
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

import psutil

from damselfly.client import Client
from damselfly.core.units import format_size, parse_size
from damselfly.testing import OriginProcess, start_cluster


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=5, help="peer downloads, the task deleted between them")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--peer-storage", default="disk", choices=["disk", "memory"], help="the fetching peer's storage")
    args = ap.parse_args()
    size = parse_size(args.size)
    root = Path(args.dir or tempfile.mkdtemp(prefix="damselfly-bench-"))
    origin = OriginProcess(root / "origin")
    cluster = None
    try:
        origin.make("big.bin", size)
        peer_env = {}
        if args.peer_storage == "memory":
            peer_env[1] = {"DAMSELFLY_DAEMON__STORAGE": json.dumps({"type": "memory", "capacity": size + (1 << 20)})}
        cluster = start_cluster(root / "cluster", 1, peer_env=peer_env)
        url = origin.url("big.bin")
        seed, peer = cluster.daemon("seed"), cluster.daemon("peer1")
        warm = asyncio.run(_download(seed["socket"], url, None))
        os.sync()  # the origin's and the seed's writes are not the peer's to pay for
        sampler = RssSampler({"seed": seed["pid"], "peer": peer["pid"]})
        rss_before = {name: p.memory_info().rss for name, p in sampler.procs.items()}
        sampler.start()
        runs = [
            asyncio.run(_download(peer["socket"], url, None, delete_after=i < args.runs - 1)) for i in range(args.runs)
        ]
        sampler.stop_event.set()
        sampler.join()
        seconds = statistics.median(runs)
        result = {
            "benchmark": "seed_throughput",
            "file_size": size,
            "peer_storage": args.peer_storage,
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / seconds / 1e6, 1),
            "runs_mb_per_s": [round(size / r / 1e6, 1) for r in runs],
            "seed_fill_seconds": round(warm, 3),
            "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in sampler.peak.items()},
            "rss_before_mb": {k: round(v / 1e6, 1) for k, v in rss_before.items()},
            "origin_bytes": origin.stats()["bytes"],
            "machine": f"{platform.machine()}, {psutil.cpu_count()} cpus, Python {platform.python_version()}",
        }
    finally:
        if cluster is not None:
            cluster.down()
        origin.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one peer <- seed on loopback, {format_size(size)} ({result['machine']})")
        print(f"  {'throughput (median)':<22}{result['mb_per_s']} MB/s ({result['seconds']} s)")
        print(f"  {'each run':<22}{', '.join(str(x) for x in result['runs_mb_per_s'])} MB/s")
        for k in ("seed", "peer"):
            print(f"  {'peak RSS ' + k:<22}{result['peak_rss_mb'][k]} MB (before: {result['rss_before_mb'][k]} MB)")
        print(f"  {'origin bytes':<22}{result['origin_bytes']} (the seed's fill only)")
        print(f"  {'json':<22}{json.dumps(result)}")


if __name__ == "__main__":
    main()
