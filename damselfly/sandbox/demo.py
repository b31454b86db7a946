"""``damselfly demo``: N peers fetch one file through the swarm, then straight from the origin.

The origin is a separate process that counts what it sends; the cluster is
real processes on 127.0.0.1, whose config therefore allows loopback origins
(``security.sources.allow_loopback: true``; the demo says so). With ``tls`` every
part speaks mutual TLS, with a fresh CA in the run's directory. The table shows
what the origin sent each way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from damselfly.core.errors import DamselflyError
from damselfly.core.units import format_size
from damselfly.sandbox import cluster as cl
from damselfly.sandbox.origin import make_file
from damselfly.sdk.client import Client


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _get_json(url: str, method: str = "GET") -> dict[str, Any]:
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def start_origin(root: Path, rate: str) -> tuple[subprocess.Popen[bytes], int]:
    args = [sys.executable, "-m", "damselfly.sandbox.origin", "--dir", str(root)]
    if rate:
        args += ["--rate", rate]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise DamselflyError(f"the demo origin did not start (exit {proc.wait()})")
    return proc, int(json.loads(line)["port"])


def scrape(metrics_addr: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape_by_label(metrics_addr: str, name: str) -> dict[str, float]:
    """The samples of a metric with one label, by that label's value."""
    found: dict[str, float] = {}
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + "{"):
                labels, _, value = line[len(name) :].rpartition(" ")
                found[labels.split('"')[1]] = float(value)
    return found


async def _p2p(cluster: dict[str, Any], url: str, out: Path) -> tuple[float, list[Any]]:
    peers = [d for d in cluster["daemons"] if not d["seed"]]

    async def one(i: int, d: dict[str, Any]) -> Any:
        async with Client(d["socket"]) as c:
            return await c.download(url, out / f"peer{i}.bin")

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i, d) for i, d in enumerate(peers, 1)))
    return time.monotonic() - t0, list(results)


async def _direct(url: str, n: int, out: Path) -> float:
    async def one(session: aiohttp.ClientSession, i: int) -> None:
        async with session.get(url) as resp:
            resp.raise_for_status()
            with (out / f"direct{i}.bin").open("wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    f.write(chunk)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    return time.monotonic() - t0


# Options a transport gets in the demo, where every peer is on loopback.
LOOPBACK_OPTIONS: dict[str, dict[str, Any]] = {"quic": {"max_datagram_size": 8192}}


def run(
    *,
    peers: int = 8,
    size: int = 128 << 20,
    origin_rate: str = "",
    directory: str | None = None,
    quiet: bool = False,
    transport: str = "tcp",
    tls: bool = False,
) -> dict[str, Any]:
    keep = directory is not None
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="damselfly-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    files, out = root / "origin", root / "out"
    files.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    origin = None
    cluster_dir = root / "cluster"
    try:
        _say(quiet, f"demo: generating a {format_size(size)} file")
        src = make_file(files / "demo.bin", size)
        want = sha256_of(src)
        origin, port = start_origin(files, origin_rate)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/demo.bin?run={int(time.time() * 1000)}"
        _say(
            quiet,
            f"demo: origin on {base}{' at ' + origin_rate if origin_rate else ''}; starting a seed and {peers} peers",
        )
        _say(quiet, f"demo: {cl.CONFIG_NOTE.replace('DIR', str(cluster_dir))}")
        if tls:
            _say(quiet, f"demo: mutual TLS everywhere, with a fresh CA in {cluster_dir / 'tls'}")
        choice = {"type": transport, **LOOPBACK_OPTIONS.get(transport, {})}
        cluster = cl.up(cluster_dir, peers, env={"DAMSELFLY_DAEMON__TRANSPORTS": json.dumps([choice])}, tls=tls)
        _get_json(f"{base}/__stats/reset", "POST")
        _say(quiet, f"demo: {peers} peers download through the swarm")
        p2p_seconds, results = asyncio.run(_p2p(cluster, url, out))
        p2p_stats = _get_json(f"{base}/__stats")
        back_to_source = sum(
            scrape(d["metrics"], "dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}')
            for d in cluster["daemons"]
        )
        by_transport: dict[str, int] = {}
        for d in cluster["daemons"]:
            for name, got in scrape_by_label(d["metrics"], "dragonfly_dfdaemon_download_transport_bytes_total").items():
                by_transport[name] = by_transport.get(name, 0) + int(got)
        digests_ok = all(sha256_of(out / f"peer{i}.bin") == want for i in range(1, peers + 1))
        for i in range(1, peers + 1):
            (out / f"peer{i}.bin").unlink()
        cl.down(cluster_dir)
        _get_json(f"{base}/__stats/reset", "POST")
        _say(quiet, f"demo: the same {peers} downloads straight from the origin")
        direct_seconds = asyncio.run(_direct(url, peers, out))
        direct_stats = _get_json(f"{base}/__stats")
        direct_ok = all(sha256_of(out / f"direct{i}.bin") == want for i in range(peers))
        return {
            "file_size": size,
            "peers": peers,
            "transport": transport,
            "tls": tls,
            "allow_loopback": cluster["allow_loopback"],
            "transport_bytes": by_transport,
            "origin_rate": origin_rate or None,
            "origin_bytes": p2p_stats["bytes"],
            "origin_requests": p2p_stats["requests"],
            "p2p_bytes": sum(r.peer_bytes for r in results),
            "back_to_source_bytes": int(back_to_source),
            "peer_source_bytes": sum(r.source_bytes for r in results),
            "all_digests_ok": digests_ok and direct_ok,
            "p2p_seconds": round(p2p_seconds, 3),
            "direct_seconds": round(direct_seconds, 3),
            "direct_origin_bytes": direct_stats["bytes"],
            "direct_origin_requests": direct_stats["requests"],
            "p2p_over_direct": round(p2p_seconds / direct_seconds, 3) if direct_seconds else None,
            "per_peer_seconds": [round(r.seconds, 3) for r in results],
        }
    finally:
        if (cluster_dir / "cluster.json").exists():
            try:
                cl.down(cluster_dir)
            except DamselflyError:
                pass
        if origin is not None:
            if origin.stdout is not None:
                origin.stdout.close()
            origin.terminate()
            origin.wait(10)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    f = r["file_size"]
    rows = [
        ("", "through the swarm", "straight from origin"),
        (
            "origin bytes sent",
            f"{format_size(r['origin_bytes'])} ({r['origin_bytes'] / f:.2f} x file)",
            f"{format_size(r['direct_origin_bytes'])} ({r['direct_origin_bytes'] / f:.2f} x file)",
        ),
        ("origin requests", str(r["origin_requests"]), str(r["direct_origin_requests"])),
        ("bytes between peers", format_size(r["p2p_bytes"]), "-"),
        ("time for all peers", f"{r['p2p_seconds']:.2f} s", f"{r['direct_seconds']:.2f} s"),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    lines = [
        f"damselfly demo: {r['peers']} peers, {format_size(f)} file"
        + (f", origin limited to {r['origin_rate']}" if r["origin_rate"] else "")
        + (", mutual TLS" if r.get("tls") else "")
    ]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.append(f"  all outputs match the origin: {'yes' if r['all_digests_ok'] else 'NO'}")
    if r.get("allow_loopback"):
        lines.append("  (every part ran on 127.0.0.1: the cluster's config allowed loopback origins)")
    if not r["origin_rate"]:
        lines.append(
            "  (an unlimited origin on this same machine outruns any relay; the default --origin-rate 50MB/s"
            " is as slow as real registries and buckets)"
        )
    return "\n".join(lines)
