"""Real container tooling for tests: a registry (Debian's ``docker-registry``), images built offline
with ``umoci`` and pushed with ``skopeo``, and a ``containerd`` to pull with.

Every process listens on 127.0.0.1 (a free port, or a unix socket in a temp dir)
and is stopped by its fixture. ``Registry.blob_reads()`` reads the registry's own
access log, so a test can count what the registry really sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')
TOOLS = ("docker-registry", "skopeo", "umoci", "containerd", "ctr")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError as exc:
            exc.close()
            return  # it answers (401 with auth on)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout}s") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Registry:
    directory: Path
    users: dict[str, str] = field(default_factory=dict)  # htpasswd auth when not empty
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ip: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "registry.log"

    def start(self, netns: str = "", ip: str = "127.0.0.1") -> Registry:
        """Listen on ``ip`` at a free port; inside network namespace ``netns`` when one is named."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ip = ip
        self.port = _free_port() if not netns else 5000
        auth = ""
        if self.users:
            import bcrypt

            salt = bcrypt.gensalt(rounds=5)
            lines = [f"{u}:{bcrypt.hashpw(p.encode(), salt).decode()}" for u, p in self.users.items()]
            (self.directory / "htpasswd").write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: damselfly-test\n    path: {self.directory / 'htpasswd'}\n"
        config = self.directory / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.directory / 'data'}\n"
            f"http:\n  addr: {self.address}\n" + auth
        )
        with open(self.log, "wb") as out:
            cmd = ["docker-registry", "serve", str(config)]
            if netns:
                cmd = ["ip", "netns", "exec", netns, *cmd]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _wait_http(f"http://{self.address}/v2/", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, uri, status, bytes sent) of every request in the access log."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                sent = int(m["bytes"]) if m["bytes"] != "-" else 0
                out.append((m["method"], m["uri"], int(m["status"]), sent))
        return out

    def blob_bytes(self) -> dict[str, int]:
        """Bytes of each blob the registry sent with GET (digest -> bytes)."""
        sent: dict[str, int] = {}
        for method, uri, status, n in self.requests():
            m = re.search(r"/blobs/(sha256:[0-9a-f]{64})", uri)
            if method == "GET" and m and status in (200, 206):
                sent[m.group(1)] = sent.get(m.group(1), 0) + n
        return sent


@dataclass
class Image:
    reference: str  # REGISTRY/REPO:TAG
    manifest_digest: str
    blobs: dict[str, int]  # digest -> size (layers and config)


def build_and_push(
    work: Path, registry: Registry, repo: str, layers: list[int], tag: str = "v1", creds: str = ""
) -> Image:
    """An image with one layer of random bytes per size in ``layers``, built with umoci, pushed with skopeo."""
    layout = work / "layout"
    run = _runner()
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    for i, size in enumerate(layers):
        bundle = work / f"bundle{i}"
        run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)])
        (bundle / "rootfs" / f"layer{i}.bin").write_bytes(os.urandom(size))
        run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)])
        shutil.rmtree(bundle)
    reference = f"{registry.address}/{repo}:{tag}"
    push = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{reference}"]
    if creds:
        push[2:2] = ["--dest-creds", creds]
    run(push)
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_text())
    blobs = {manifest["config"]["digest"]: manifest["config"]["size"]}
    blobs.update({layer["digest"]: layer["size"] for layer in manifest["layers"]})
    return Image(reference, manifest_digest, blobs)


def _runner():  # type: ignore[no-untyped-def]
    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()[-500:]}")
        return proc

    return run


def skopeo_pull(work: Path, reference: str, mirror: str, name: str, creds: str = "") -> str:
    """Pull with skopeo through ``mirror`` (a registries.conf mirror); the pulled manifest's digest."""
    from damselfly.oci.runtimes import runtime_snippet

    registry = reference.split("/", 1)[0]
    conf = work / f"registries-{name}.conf"
    conf.write_text(runtime_snippet("skopeo", mirror, f"http://{registry}"))  # what `runtime-config skopeo` prints
    out = work / f"pulled-{name}"
    cmd = ["skopeo", "--registries-conf", str(conf), "copy", "--src-tls-verify=false"]
    if creds:
        cmd += ["--src-creds", creds]
    _runner()([*cmd, f"docker://{reference}", f"oci:{out}:pulled"])
    return str(json.loads((out / "index.json").read_text())["manifests"][0]["digest"])


@dataclass
class Containerd:
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "containerd.sock"

    def start(self) -> Containerd:
        d = self.directory
        (d / "root").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(parents=True, exist_ok=True)
        config = d / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{d / "root"}"\nstate = "{d / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{d / "ttrpc.sock"}"\n'
            '[debug]\n  level = "warn"\n'
        )
        with open(d / "containerd.log", "wb") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(d / 'containerd.log').read_text()[-500:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def pull(self, reference: str, mirror: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` with a hosts.toml naming ``mirror`` first and the registry after it."""
        from damselfly.oci.runtimes import runtime_snippet

        registry = reference.split("/", 1)[0]
        hosts = self.directory / "hosts" / registry
        hosts.mkdir(parents=True, exist_ok=True)
        # the very snippet `damselfly runtime-config containerd` prints
        (hosts / "hosts.toml").write_text(runtime_snippet("containerd", mirror, f"http://{registry}"))
        cmd = ["ctr", "--address", str(self.socket), "images", "pull", "--hosts-dir", str(self.directory / "hosts")]
        cmd += ["--plain-http", "--snapshotter", "native", reference]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def active(self) -> dict[str, int]:
        """Bytes received so far of each transfer under way (``ctr content active``), by ingest ref."""
        out = subprocess.run(
            ["ctr", "--address", str(self.socket), "content", "active"], capture_output=True, text=True, check=True
        ).stdout
        units = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}
        active = {}
        for line in out.splitlines()[1:]:
            cols = line.split("\t")
            m = re.fullmatch(r"([\d.]+)\s*([kMG]?B)", cols[1].strip()) if len(cols) > 1 else None
            if m:
                active[cols[0]] = int(float(m[1]) * units[m[2]])
        return active

    def image_digest(self, reference: str) -> str:
        out = subprocess.run(
            ["ctr", "--address", str(self.socket), "images", "ls"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            cols = line.split()
            if cols and cols[0] == reference:
                return next(c for c in cols if c.startswith("sha256:"))
        raise AssertionError(f"{reference} is not in containerd's image list:\n{out}")


def registry_fixture(directory: Path, users: dict[str, str] | None = None) -> Iterator[Registry]:
    r = Registry(directory, dict(users or {})).start()
    try:
        yield r
    finally:
        r.stop()


class Limiter(threading.Thread):
    """A TCP forwarder on 127.0.0.1 to ``target``; what it sends back, all connections together, stays under ``rate``.

    ``forwarded`` counts the bytes it has sent back so far.
    """

    def __init__(self, target: tuple[str, int], rate: int):
        super().__init__(daemon=True)
        self.target, self.rate = target, rate
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.forwarded = 0
        self.ready = threading.Event()
        self.allowance = 0.0
        self.stamp = time.monotonic()
        self._stop_event: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
                if limited:
                    self.forwarded += len(data)
        except OSError:
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    def run(self) -> None:
        async def main() -> None:
            self._stop_event = asyncio.Event()
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            async with server:
                await self._stop_event.wait()

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> Limiter:
        self.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stop_event is not None and self.is_alive():
            self.loop.call_soon_threadsafe(self._stop_event.set)
            self.join(10)
