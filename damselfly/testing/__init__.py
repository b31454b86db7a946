"""Helpers for testing with damselfly: a counting origin and a process cluster.

Other projects get the fixtures of ``damselfly.testing.fixtures`` through the
pytest plugin entry point: ``damselfly_origin`` and ``damselfly_cluster_factory``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damselfly.config import TlsConfig
from damselfly.sandbox import cluster as cl
from damselfly.sandbox.demo import scrape, start_origin
from damselfly.sandbox.origin import make_file
from damselfly.sdk.client import SyncClient

if TYPE_CHECKING:
    import grpc


class OriginProcess:
    """``python -m damselfly.sandbox.origin`` serving ``root``; counts bytes and requests."""

    def __init__(self, root: Path, rate: str = ""):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.proc, self.port = start_origin(root, rate)

    def make(self, name: str, size: int, seed: int = 7) -> Path:
        return make_file(self.root / name, size, seed)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/__stats/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """A running ``cluster up``: scheduler, optional seed and peers, as processes."""

    directory: Path
    info: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    peer_env: dict[int, dict[str, str]] = field(default_factory=dict)
    procs: list[cl.Proc] = field(default_factory=list)

    @property
    def daemons(self) -> list[dict[str, Any]]:
        return self.info["daemons"]

    @property
    def tls(self) -> TlsConfig | None:
        """The ``security.tls`` of a client of this cluster (certificate role client), or None
        without TLS: for a test that calls the scheduler or an upload server itself."""
        files = self.info.get("tls")
        if not files:
            return None
        return TlsConfig(ca=Path(files["ca"]), cert=Path(files["cert"]), key=Path(files["key"]))

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        """A gRPC channel to ``address`` (default: the first scheduler), with the cluster's
        client certificate when it runs TLS."""
        from damselfly.security import tls

        return tls.grpc_channel(address or self.info["scheduler"], self.tls)

    def daemon(self, name: str) -> dict[str, Any]:
        for d in self.daemons:
            if d["name"] == name:
                return d
        raise KeyError(name)

    def client(self, name: str) -> SyncClient:
        return SyncClient(self.daemon(name)["socket"])

    def metric(self, name: str, metric: str, labels: str = "") -> float:
        return scrape(self.daemon(name)["metrics"], metric, labels)

    def log(self, name: str) -> str:
        return (self.directory / "logs" / f"{name}.log").read_text(errors="replace")

    def stop_daemon(self, name: str, *, kill: bool = False) -> None:
        d = self.daemon(name)
        cl.stop_pids([int(d["pid"])], grace=0.0 if kill else 5.0)

    def restart_daemon(self, name: str) -> dict[str, Any]:
        idx = 0 if name == "seed" else int(name.removeprefix("peer"))
        base = cl.base_env({**self.env, **self.peer_env.get(idx, {})})
        proc = cl.start_daemon(self.directory, name, [s["address"] for s in self.info["schedulers"]], base)
        self.procs.append(proc)
        info = {"name": name, **cl.wait_ready([proc])[name]}
        self.info["daemons"] = [info if d["name"] == name else d for d in self.daemons]
        return info

    def stop_scheduler(self, address: str | None = None, *, kill: bool = False) -> None:
        """Stop the scheduler at ``address`` (default: the first)."""
        s = next(s for s in self.info["schedulers"] if address in (None, s["address"]))
        cl.stop_pids([int(s["pid"])], grace=0.0 if kill else 5.0)

    def down(self) -> None:
        cl.stop_pids([p.popen.pid for p in self.procs])
        for p in self.procs:
            p.popen.wait()


def start_cluster(
    directory: Path,
    peers: int,
    *,
    seed: bool = True,
    env: dict[str, str] | None = None,
    peer_env: dict[int, dict[str, str]] | None = None,
    schedulers: int = 1,
    tls: bool = False,
    allow_loopback: bool = True,
) -> Cluster:
    """Start a cluster of processes on 127.0.0.1 (see :func:`damselfly.sandbox.cluster.start`): with
    ``tls``, mutual TLS everywhere with a fresh CA; its config allows loopback origins unless
    ``allow_loopback`` is False."""
    info, procs = cl.start(
        directory,
        peers,
        seed=seed,
        env=env,
        peer_env=peer_env,
        schedulers=schedulers,
        tls=tls,
        allow_loopback=allow_loopback,
    )
    return Cluster(directory, info, dict(env or {}), dict(peer_env or {}), procs)
