"""A bandwidth-limited swarm in network namespaces against the Kumar-Ross bound.

    sudo python benchmarks/swarm.py [--scenario uniform|mixed|churn] [--hosts 16] [--rate 50mbit]
                                    [--size 128MiB] [--strategies out-of-box,dragonfly] [--json]

Each host is a network namespace on one bridge with its own 10.77.0.x address;
its upload and its download are each shaped to its rate with ``tc`` (htb and a
short bfifo). The origin (an HTTP server) has its own rate (``--origin-rate``),
the scheduler and the seed their own hosts; one peer daemon runs per host. For
each strategy a fresh scheduler, seed and daemons start, every host starts the
same download at once, and the script records each host's completion time, the
bytes the origin sent and the CPU the daemons spent per GiB delivered. Then, as a
baseline, the same hosts download the file straight from the origin.

Scenarios (``damselfly.testing.swarmconfig.scenario_config``):

- ``uniform`` (default): every host at ``--rate``, the origin at 400 Mbit/s.
- ``mixed``: a quarter of the hosts (4 of 16) at ``--fast-rate`` (default 4 x ``--rate``,
  200 Mbit/s), the rest and the seed at ``--rate``, the origin at 2 x ``--rate``
  (100 Mbit/s). Each class's p50 is reported too.
- ``churn``: as uniform, and a quarter of the hosts (``--joiners``, 4 of 16) start their
  daemons at 0.3 x T_min and download as soon as the scheduler knows them; an eighth
  (``--leavers``, 2 of 16) of the others are killed (SIGKILL) at 0.5 x T_min. The
  staying hosts' copies are checked (sha256); the killed ones are reported as ``left``.
  The straight-from-the-origin baseline is skipped: it has no churn to compare with.

T_min is Kumar and Ross's bound for heterogeneous rates with the origin as the
server (every peer reads a share of the source, so the origin sends to peers
directly): max(F / r_origin, F / d_min, (N+1) F / (r_origin + u_seed + sum u_i)),
over the seed and the N peers. Each host's own bound is max(F / r_origin, F / d_i);
``*_own_ratio`` is a host's time over it. Rates are link rates: ``tc`` counts whole
frames, so payload tops out near 0.956 of them and no run beats about 1.05 x T_min.

``cpu_seconds_per_gib``: the CPU seconds (user and system) the seed and peer daemons
spent from the start of the downloads to the last finish, over the GiB delivered to
peers; ``scheduler_cpu_seconds`` is the scheduler's over the same time.

Needs root. Every namespace, link and process is removed at the end, also after
an error or Ctrl-C, and a run removes what an earlier killed run left. ``--prefix``
and ``--subnet`` keep concurrent labs on one machine apart.
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
from damselfly.testing import netns, netswarm, swarmconfig


def table(result: dict) -> str:
    rows = [
        f"T_min = {result['t_min_seconds']:.2f} s ({result['scenario']}: {result['hosts']} hosts"
        + (
            f", {result['fast_hosts']} at {result['fast_rate']} and {result['hosts'] - result['fast_hosts']}"
            if result.get("fast_hosts")
            else ""
        )
        + f" at {result['rate']}, origin {result['origin_rate']}, F = {result['size']})"
    ]
    rows.append(
        f"{'strategy':<10} {'p50 T/Tmin':>10} {'p90':>6} {'max':>6} {'max own':>8} {'origin/F':>9} "
        f"{'seed up/F':>10} {'cpu s/GiB':>10} {'max s':>7}"
    )
    runs = {**result["strategies"], **({"direct": result["direct"]} if result.get("direct") else {})}
    for name, r in runs.items():
        cpu = r.get("cpu_seconds_per_gib")
        rows.append(
            f"{name:<10} {r['p50_ratio']:>10.3f} {r['p90_ratio']:>6.3f} {r['max_ratio']:>6.3f} "
            f"{r['max_own_ratio']:>8.3f} {r['origin_ratio']:>9.2f} {r['seed_upload_ratio']:>10.2f} "
            f"{'-' if cpu is None else f'{cpu:.2f}':>10} {r['max_seconds']:>7.1f}"
        )
    for name, r in runs.items():
        if r.get("classes"):
            parts = [
                f"{label} ({c['hosts']}) p50 {c['p50_ratio']:.3f} x T_min, {c['p50_own_ratio']:.3f} x own"
                for label, c in r["classes"].items()
            ]
            rows.append(f"{name}: " + "; ".join(parts))
        if "left" in r:
            joiners = ", ".join(
                f"{n} {j['seconds_from_common_start']:.1f} s ({j['seconds_from_own_start']:.1f} s own)"
                for n, j in r["joiners"].items()
            )
            rows.append(
                f"{name}: left {', '.join(r['left']) or '-'}; joined {joiners or '-'}; "
                f"{len(r['correct_hosts'])} copies verified"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=swarmconfig.SCENARIOS, default="uniform")
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--rate", default="50mbit", help="each host's upload and download")
    ap.add_argument("--fast-rate", default="", help="mixed: the fast hosts' rate (default 4 x --rate)")
    ap.add_argument("--seed-rate", default="", help="the seed host's rate (default: --rate)")
    ap.add_argument(
        "--origin-rate",
        default="",
        help="what the origin sends, all clients together (default 400mbit; mixed: 2 x --rate)",
    )
    ap.add_argument("--joiners", type=int, default=None, help="churn: hosts that join late (default a quarter)")
    ap.add_argument("--leavers", type=int, default=None, help="churn: hosts killed mid-download (default an eighth)")
    ap.add_argument("--size", default="128MiB")
    ap.add_argument(
        "--piece-length", default="", help="fix the task's piece length (default: the daemon's choice for --size)"
    )
    ap.add_argument(
        "--strategies", default="out-of-box,dragonfly", help=f"comma-separated, of {', '.join(swarmconfig.PROFILES)}"
    )
    ap.add_argument("--no-direct", action="store_true", help="skip the straight-from-the-origin baseline")
    ap.add_argument("--mtu", type=int, default=netns.MTU, help="every link's MTU (default 1500)")
    ap.add_argument("--prefix", default="dfsw", help="names of the namespaces and links (at most 8 characters)")
    ap.add_argument("--subnet", default="10.77.0", help="the bridge's /24, as its first three octets")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    why = netns.unavailable()
    if why:
        raise SystemExit(f"swarm benchmark: {why}")
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in swarmconfig.PROFILES]
    if unknown:
        raise SystemExit(f"unknown strategies: {', '.join(unknown)} (known: {', '.join(swarmconfig.PROFILES)})")
    cfg = swarmconfig.scenario_config(
        args.scenario,
        hosts=args.hosts,
        rate_bits=swarmconfig.parse_bits(args.rate),
        fast_rate_bits=swarmconfig.parse_bits(args.fast_rate) if args.fast_rate else 0,
        origin_rate_bits=swarmconfig.parse_bits(args.origin_rate) if args.origin_rate else 0,
        late_hosts=args.joiners,
        killed_hosts=args.leavers,
        seed_rate_bits=swarmconfig.parse_bits(args.seed_rate) if args.seed_rate else 0,
        size=parse_size(args.size),
        piece_length=parse_size(args.piece_length) if args.piece_length else 0,
        mtu=args.mtu,
        prefix=args.prefix,
        subnet=args.subnet,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below cleans up
    work = Path(tempfile.mkdtemp(prefix="dfswarm-"))
    result: dict = {
        "scenario": args.scenario,
        "hosts": cfg.hosts,
        "rate": args.rate,
        "size": args.size,
        "piece_length": cfg.piece_length or piece_length_for(cfg.size),
        "origin_rate": f"{cfg.origin_rate_bits / 1e6:g}mbit",
        "mtu": cfg.mtu,
        "t_min_seconds": round(cfg.t_min(), 3),
        "strategies": {},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    if cfg.fast_hosts:
        result |= {"fast_hosts": cfg.fast_hosts, "fast_rate": f"{cfg.fast_rate_bits / 1e6:g}mbit"}
    if cfg.late_hosts or cfg.killed_hosts:
        result |= {
            "joiners": cfg.late_hosts,
            "leavers": cfg.killed_hosts,
            "join_at": cfg.join_at,
            "kill_at": cfg.kill_at,
        }
    try:
        with netswarm.SwarmLab(cfg, work) as lab:
            for name in names:
                result["strategies"][name] = lab.run(swarmconfig.PROFILES[name])
                print(f"{name}: done", file=sys.stderr)
            if args.scenario == "churn":
                result["direct_skipped"] = "churn: hosts that join late or leave have no straight-from-origin twin"
            elif not args.no_direct:
                result["direct"] = lab.direct()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
