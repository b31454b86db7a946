"""8 runtimes pull one 4-layer image at once: through the swarm vs straight from a rate-limited registry.

    python benchmarks/registry_pull.py [--peers 8] [--size 256MiB] [--rate 50MB/s] [--json]

A real registry (docker-registry) holds an image of four layers of random bytes
(``--size`` in all), built with umoci and pushed with skopeo. A forwarder in front
of it caps what the registry can send at ``--rate`` (all connections together), as
a registry's uplink would. Then, in one run:

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
import asyncio
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from damselfly.core.units import format_size, parse_rate, parse_size
from damselfly.testing import registry as reg
from damselfly.testing import start_cluster


class Limiter(threading.Thread):
    """A TCP forwarder to ``target`` whose downstream bytes, all connections together, stay under ``rate``."""

    def __init__(self, target: tuple[str, int], rate: int):
        super().__init__(daemon=True)
        self.target, self.rate = target, rate
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.ready = threading.Event()
        self.allowance = 0.0
        self.stamp = time.monotonic()

    async def _take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.allowance = min(self.rate * 0.05, self.allowance + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.allowance >= n:
                self.allowance -= n
                return
            await asyncio.sleep((n - self.allowance) / self.rate)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limited: bool) -> None:
        try:
            while data := await reader.read(64 * 1024):
                if limited:
                    await self._take(len(data))
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    def run(self) -> None:
        async def main() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            await asyncio.Event().wait()

        self.loop.run_until_complete(main())


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--size", default="256MiB", help="All four layers together.")
    ap.add_argument("--rate", default="50MB/s", help="What the registry can send, all pulls together.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if reg.missing_tools():
        raise SystemExit(f"needs {', '.join(reg.missing_tools())} (scripts/setup.sh installs them)")
    size, rate = parse_size(args.size), parse_rate(args.rate)
    work = Path(tempfile.mkdtemp(prefix="damselfly-bench-registry-"))
    registry = reg.Registry(work / "registry").start()
    try:
        image = reg.build_and_push(work / "image", registry, "bench/app", [size // 4] * 4)
        limiter = Limiter(("127.0.0.1", registry.port), rate)
        limiter.start()
        limiter.ready.wait(10)
        reference = f"127.0.0.1:{limiter.port}/bench/app:v1"
        image_bytes = sum(image.blobs.values())
        results = {}

        before = sum(registry.blob_bytes().values())
        seconds = _pulls(work, reference, [None] * args.peers)
        results["direct"] = {"registry_bytes": sum(registry.blob_bytes().values()) - before, "slowest_s": seconds}

        env = {"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://127.0.0.1:{limiter.port}"}
        cluster = start_cluster(work / "cluster", args.peers, env=env)
        try:
            proxies = [d["proxy"] for d in cluster.daemons if not d["seed"]]
            before = sum(registry.blob_bytes().values())
            seconds = _pulls(work, reference, proxies)
            results["swarm"] = {"registry_bytes": sum(registry.blob_bytes().values()) - before, "slowest_s": seconds}
        finally:
            cluster.down()
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "machine": f"{os.cpu_count()} cpus, Python {platform.python_version()}",
        "peers": args.peers,
        "image_bytes": image_bytes,
        "layers": len(image.blobs) - 1,
        "registry_rate": rate,
        **results,
        "slowest_ratio": round(results["swarm"]["slowest_s"] / results["direct"]["slowest_s"], 3),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'':8}{'registry sent':>16}{'x image':>9}{'slowest pull':>14}")
    for name in ("direct", "swarm"):
        r = results[name]
        print(
            f"{name:8}{format_size(r['registry_bytes']):>16}{r['registry_bytes'] / image_bytes:>9.2f}"
            f"{r['slowest_s']:>13.1f}s"
        )
    print(f"slowest swarm pull / slowest direct pull = {out['slowest_ratio']} (target <= 0.4)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
