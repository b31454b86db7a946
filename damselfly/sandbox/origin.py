"""A local origin for the demo, tests and benchmarks: files over HTTP that count.

It serves every file of a directory with HEAD, GET and single ``Range``
requests, can be limited by a token bucket shared by all requests (as a real
registry or bucket is), and reports the bytes and requests it served at
``GET /__stats`` (``POST /__stats/reset`` zeroes them).

    python -m damselfly.sandbox.origin --dir DIR [--rate 50MB/s] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from damselfly.core.units import parse_rate, parse_size

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class TokenBucket:
    """``rate`` bytes a second shared by every caller, with a burst of one chunk."""

    def __init__(self, rate: int, burst: int = CHUNK):
        self.rate = rate
        self.burst = max(burst, 1)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


@dataclass
class Stats:
    bytes_sent: int = 0
    requests: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "bytes": self.bytes_sent,
            "requests": self.requests,
            "by_method": self.by_method,
            "by_path_bytes": self.by_path,
        }


class Origin:
    def __init__(self, root: Path, rate: int = 0):
        self.root = root.resolve()
        self.bucket = TokenBucket(rate) if rate else None
        self.stats = Stats()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _file(self, request: web.Request) -> Path:
        rel = request.match_info["path"]
        path = (self.root / rel).resolve()
        if self.root not in path.parents or not path.is_file():
            raise web.HTTPNotFound(text=f"no such file: /{rel}\n")
        return path

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.by_method[request.method] = self.stats.by_method.get(request.method, 0) + 1
        path = self._file(request)
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        header = request.headers.get("Range")
        if header:
            m = _RANGE.match(header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(size - int(m.group(2)), 0)
            if start >= size or start > end:
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
            status = 206
        length = max(end - start + 1, 0)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", "Content-Length": str(length)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        key = "/" + request.match_info["path"]
        with path.open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                n = min(CHUNK, left)
                if self.bucket is not None:
                    await self.bucket.take(n)
                chunk = f.read(n)
                if not chunk:
                    break
                await resp.write(chunk)
                left -= len(chunk)
                self.stats.bytes_sent += len(chunk)
                self.stats.by_path[key] = self.stats.by_path.get(key, 0) + len(chunk)
        await resp.write_eof()
        return resp

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats.to_dict())

    async def _reset(self, _: web.Request) -> web.Response:
        self.stats = Stats()
        return web.json_response({"ok": True})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/__stats", self._stats)
        app.router.add_post("/__stats/reset", self._reset)
        app.router.add_route("GET", "/{path:.+}", self._serve)
        app.router.add_route("HEAD", "/{path:.+}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def make_file(path: Path, size: int, seed: int = 7) -> Path:
    """A file of ``size`` pseudo-random bytes (same seed, same bytes), written atomically."""
    import random

    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        block = rng.randbytes(1 << 20)
        left = size
        i = 0
        while left > 0:
            n = min(len(block), left)
            # vary each MiB so no two pieces share a digest
            f.write(i.to_bytes(8, "big") + block[8:n] if n >= 8 else block[:n])
            left -= n
            i += 1
    os.replace(tmp, path)
    return path


async def _main(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.make:
        name, _, size = args.make.partition(":")
        make_file(root / name, parse_size(size))
    origin = Origin(root, parse_rate(args.rate) if args.rate else 0)
    port = await origin.start(args.host, args.port)
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await origin.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m damselfly.sandbox.origin", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="directory to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", default="", help="token-bucket limit for all requests together, e.g. 50MB/s")
    p.add_argument("--make", default="", help="NAME:SIZE, create a file of that size first")
    args = p.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
