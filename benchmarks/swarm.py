"""A bandwidth-limited swarm in network namespaces against the Kumar-Ross bound.

    sudo python benchmarks/swarm.py [--hosts 16] [--rate 50mbit] [--size 128MiB]
                                    [--strategies default,swarm] [--json]

Each host is a network namespace on one bridge with its own 10.77.0.x address;
its upload and its download are each shaped to ``--rate`` with ``tc`` (htb and a
short bfifo). The origin (an HTTP server) has its own rate (``--origin-rate``),
the scheduler and the seed their own hosts; one peer daemon runs per host. For
each strategy a fresh scheduler, seed and daemons start, every host starts the
same download at once, and the script records each host's completion time and
the bytes the origin sent. Then, as a baseline, the same hosts download the file
straight from the origin.

T_min is the Kumar-Ross bound with the seed as the server,
max(F/u_seed, F/d_min, N F / (u_seed + N u)), and F / min(origin, seed rate)
since the seed must first receive the file. Rates are link rates: ``tc`` counts
whole frames, so payload tops out near 0.956 of them and no run beats about
1.05 x T_min.

Needs root. Every namespace, link and process is removed at the end, also after
an error or Ctrl-C, and a run removes what an earlier killed run left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from damselfly.core.piece import piece_length_for
from damselfly.core.units import parse_size
from damselfly.testing import netswarm


def table(result: dict) -> str:
    rows = [
        f"T_min = {result['t_min_seconds']:.2f} s ({result['hosts']} hosts at {result['rate']}, F = {result['size']})"
    ]
    rows.append(
        f"{'strategy':<10} {'p50 T/Tmin':>10} {'p90':>6} {'max':>6} {'origin/F':>9} {'seed up/F':>10} {'max s':>7}"
    )
    for name, r in {**result["strategies"], **({"direct": result["direct"]} if result.get("direct") else {})}.items():
        rows.append(
            f"{name:<10} {r['p50_ratio']:>10.3f} {r['p90_ratio']:>6.3f} {r['max_ratio']:>6.3f} "
            f"{r['origin_ratio']:>9.2f} {r['seed_upload_ratio']:>10.2f} {r['max_seconds']:>7.1f}"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--rate", default="50mbit", help="each host's upload and download")
    ap.add_argument("--seed-rate", default="", help="the seed host's rate (default: --rate)")
    ap.add_argument("--origin-rate", default="400mbit", help="what the origin sends, all clients together")
    ap.add_argument("--size", default="128MiB")
    ap.add_argument(
        "--piece-length", default="", help="fix the task's piece length (default: the daemon's choice for --size)"
    )
    ap.add_argument("--strategies", default="default,swarm", help=f"comma-separated, of {', '.join(netswarm.PROFILES)}")
    ap.add_argument("--no-direct", action="store_true", help="skip the straight-from-the-origin baseline")
    ap.add_argument("--mtu", type=int, default=netswarm.MTU, help="every link's MTU (default 1500)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    why = netswarm.unavailable()
    if why:
        raise SystemExit(f"swarm benchmark: {why}")
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in netswarm.PROFILES]
    if unknown:
        raise SystemExit(f"unknown strategies: {', '.join(unknown)} (known: {', '.join(netswarm.PROFILES)})")
    cfg = netswarm.SwarmConfig(
        hosts=args.hosts,
        rate_bits=netswarm.parse_bits(args.rate),
        seed_rate_bits=netswarm.parse_bits(args.seed_rate) if args.seed_rate else 0,
        origin_rate_bits=netswarm.parse_bits(args.origin_rate),
        size=parse_size(args.size),
        piece_length=parse_size(args.piece_length) if args.piece_length else 0,
        mtu=args.mtu,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below cleans up
    work = Path(tempfile.mkdtemp(prefix="dfswarm-"))
    result: dict = {
        "hosts": cfg.hosts,
        "rate": args.rate,
        "size": args.size,
        "piece_length": cfg.piece_length or piece_length_for(cfg.size),
        "origin_rate": args.origin_rate,
        "mtu": cfg.mtu,
        "t_min_seconds": round(cfg.t_min(), 3),
        "strategies": {},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    try:
        with netswarm.SwarmLab(cfg, work) as lab:
            for name in names:
                result["strategies"][name] = lab.run(netswarm.PROFILES[name])
                print(f"{name}: done", file=sys.stderr)
            if not args.no_direct:
                result["direct"] = lab.direct()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
