"""CPU per GiB of a loopback swarm: N peers and a seed fetch one file at once through the scheduler.

    python benchmarks/swarm_cpu.py [--peers 8] [--size 256MiB] [--piece-length 4MiB] [--runs 2] [--json]

A scheduler, a seed and N peer daemons run as processes on 127.0.0.1 (``cluster up``),
with the configuration's defaults (the ``swarm`` strategy, shared source reads); a local
origin serves the file at full speed. Each run downloads a fresh url on every peer at
once. Over the window from the first request to the last finish it reports the CPU
seconds (user + system, all threads) of the seed and the peers, and of the scheduler
apart, over the GiB delivered to the peers (``cpu_seconds_per_gib``), and per piece
delivered: SyncPieces announcements, upload-slot refusals. ``--profile NAME:OUT``
records that process (``seed``, ``peer1``, ``scheduler``) with py-spy over the first
run's window (``--native`` for gRPC's C core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from damselfly.core.units import format_size, parse_size
from damselfly.sandbox import cluster as cl
from damselfly.sdk.client import Client
from damselfly.testing import OriginProcess
from damselfly.testing.swarmconfig import cpu_times

GIB = 1 << 30
PREFIX = "dragonfly_dfdaemon_"


def _metric_sum(addr: str, name: str, labels: str = "") -> float:
    total = 0.0
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(PREFIX + name + labels + " "):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def _all(peers: list[dict[str, Any]], url: str, piece_length: int) -> list[Any]:
    async def one(d: dict[str, Any]) -> Any:
        async with Client(d["socket"]) as c:
            return await c.download(url, piece_length=piece_length)

    return list(await asyncio.gather(*(one(d) for d in peers)))


async def _delete(daemons: list[dict[str, Any]], task_id: str) -> None:
    """The run's task off every daemon, once all have finished: the next run starts bare."""
    for d in daemons:
        async with Client(d["socket"]) as c:
            await c.delete_task(task_id)


def _counters(daemons: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "announced": sum(_metric_sum(d["metrics"], "sync_piece_total", '{outcome="announced"}') for d in daemons),
        "skipped": sum(_metric_sum(d["metrics"], "sync_piece_total", '{outcome="skipped"}') for d in daemons),
        "busy": sum(_metric_sum(d["metrics"], "upload_busy_total") for d in daemons),
        "served": sum(_metric_sum(d["metrics"], "upload_piece_total") for d in daemons),
        "endgame": sum(_metric_sum(d["metrics"], "endgame_piece_total") for d in daemons),
    }


def run_once(info: dict[str, Any], origin: OriginProcess, size: int, piece_length: int, i: int, profile: Any) -> dict:
    daemons = info["daemons"]
    peers = [d for d in daemons if d["name"] != "seed"]
    seed = next(d for d in daemons if d["name"] == "seed")
    url = origin.url(f"big.bin?run={time.time_ns()}-{i}")
    spy = None
    if profile is not None:
        name, out, extra = profile
        pid = info["scheduler_pid"] if name == "scheduler" else next(d["pid"] for d in daemons if d["name"] == name)
        fmt = {"json": "speedscope", "txt": "raw"}.get(out.rpartition(".")[2], "flamegraph")
        spy_bin = str(Path(sys.executable).with_name("py-spy"))
        args = [spy_bin, "record", "-o", out, "--pid", str(pid), "-r", "200", "--gil", "-f", fmt, *extra]
        spy = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    before_counts = _counters(daemons)
    before = {d["name"]: cpu_times(d["pid"]).total for d in daemons}
    sched_before = cpu_times(info["scheduler_pid"]).total
    t0 = time.monotonic()
    results = asyncio.run(_all(peers, url, piece_length))
    seconds = time.monotonic() - t0
    cpu = {d["name"]: cpu_times(d["pid"]).total - before[d["name"]] for d in daemons}
    sched = cpu_times(info["scheduler_pid"]).total - sched_before
    asyncio.run(_delete(daemons, results[0].task_id))
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    counts = {k: v - before_counts[k] for k, v in _counters(daemons).items()}
    delivered = sum(r.peer_bytes + r.source_bytes for r in results)
    pieces = delivered / piece_length
    daemons_cpu = sum(cpu.values())
    return {
        "seconds": round(seconds, 3),
        "delivered_bytes": delivered,
        "cpu_seconds_per_gib": round(daemons_cpu / (delivered / GIB), 3),
        "cpu_seconds": {
            "daemons": round(daemons_cpu, 2),
            "seed": round(cpu[seed["name"]], 2),
            "scheduler": round(sched, 2),
        },
        "per_piece": {
            "sync_announced": round(counts["announced"] / pieces, 2),
            "sync_skipped": round(counts["skipped"] / pieces, 2),
            "busy_answers": round(counts["busy"] / pieces, 2),
            "served": round(counts["served"] / pieces, 2),
            "endgame": round(counts["endgame"] / pieces, 2),
            "daemon_cpu_ms": round(daemons_cpu / pieces * 1e3, 2),
        },
        "source_bytes": sum(r.source_bytes for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--piece-length", default="4MiB")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--origin-rate", default="", help="the origin's rate (e.g. 20MB/s; default: unlimited)")
    ap.add_argument("--profile", default="", help="NAME:OUT.svg|OUT.json: py-spy record that process in the first run")
    ap.add_argument("--native", action="store_true", help="py-spy --native (with --profile)")
    ap.add_argument("--dir", default=None, help="work directory, kept (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size, piece_length = parse_size(args.size), parse_size(args.piece_length)
    root = Path(args.dir or tempfile.mkdtemp(prefix="damselfly-swarmcpu-"))
    root.mkdir(parents=True, exist_ok=True)
    origin = OriginProcess(root / "origin", args.origin_rate)
    info = None
    runs: list[dict[str, Any]] = []
    try:
        origin.make("big.bin", size)
        info, _ = cl.start(root / "cluster", args.peers)
        os.sync()
        for i in range(args.runs):
            profile = None
            if args.profile and i == 0:
                name, _, out = args.profile.partition(":")
                profile = (name, out, ["--native"] if args.native else [])
            runs.append(run_once(info, origin, size, piece_length, i, profile))
            os.sync()
    finally:
        if info is not None:
            cl.down(root / "cluster")
        origin.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "swarm_cpu",
        "peers": args.peers,
        "file_size": size,
        "piece_length": piece_length,
        "origin_rate": args.origin_rate or None,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cpus, Python {platform.python_version()}",
        "cpu_seconds_per_gib": round(statistics.median(r["cpu_seconds_per_gib"] for r in runs), 3),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.peers} peers + a seed on loopback, {format_size(size)} in {format_size(piece_length)} pieces")
    head = f"  {'run':<5}{'s':>8}{'CPU s/GiB':>11}{'seed CPU':>10}{'sched CPU':>10}"
    print(head + f"{'sync/pc':>9}{'skip/pc':>9}{'busy/pc':>9}{'endgame/pc':>11}{'ms/pc':>8}")
    for i, r in enumerate(runs):
        pp = r["per_piece"]
        print(
            f"  {i:<5}{r['seconds']:>8}{r['cpu_seconds_per_gib']:>11}{r['cpu_seconds']['seed']:>10}"
            f"{r['cpu_seconds']['scheduler']:>10}{pp['sync_announced']:>9}{pp['sync_skipped']:>9}"
            f"{pp['busy_answers']:>9}{pp['endgame']:>11}{pp['daemon_cpu_ms']:>8}"
        )
    print(f"  json: {json.dumps(report)}")


if __name__ == "__main__":
    sys.exit(main())
