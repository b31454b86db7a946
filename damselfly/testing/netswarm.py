"""A run (``SwarmLab.run``) starts a scheduler, a seed and one daemon per host with a
``Profile``'s settings; every host downloads one file at once and the run reports each
host's time over the Kumar-Ross bound (``swarmconfig.kumar_ross``), the origin's bytes, the CPU the
daemons spent per GiB delivered. ``SwarmConfig`` gives hosts different rates (``mixed``)
and lets hosts join late and leave (``churn``): ``scenario_config`` builds the three
scenarios of benchmarks/swarm.py. ``out-of-box`` sets no tuning; the lab sets only where
each process lives (addresses, host name, scheduler, data directory, seed or not, log
level, no proxy and no plugin autoloading) and that the origin's private subnet is allowed.
The other profiles also declare each shaped host's rate (``host.max_tx_bandwidth`` and
``max_rx_bandwidth``), as an operator who knows the links would.

The network (namespaces, shaped links) is ``netns``; the configuration, profiles and bounds are
``swarmconfig``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damselfly.core.errors import DamselflyError
from damselfly.sandbox import cluster as cl
from damselfly.sandbox.demo import scrape
from damselfly.testing.netns import READY_TIMEOUT, NetHost, Network, spawn
from damselfly.testing.swarmconfig import CpuTimes, GiB, Profile, SwarmConfig, cpu_times, quantile

# One host's plain HTTP download, started on a word from stdin so all begin at one instant.
_DIRECT = """
import os, sys, time, urllib.request
url = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
with urllib.request.urlopen(url, timeout=600) as resp:
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
t = os.times()
print(f"{time.time()} {n} {t.user + t.system} {t.system}", flush=True)
"""


@dataclass
class _Run:
    """One strategy's run in progress; times are seconds after the common start."""

    profile: Profile
    work: Path
    scheduler: str
    trace: Path | None
    procs: dict[str, cl.Proc]  # sched, seed, h1...: every process started, joiners too
    info: dict[str, dict[str, Any]]  # each daemon's ready file
    cpu_from: dict[str, CpuTimes] = field(default_factory=dict)  # when its part of the downloads began
    cpu_to: dict[str, CpuTimes] = field(default_factory=dict)  # at the last finish, or at its kill
    started: dict[str, float] = field(default_factory=dict)  # each peer's download request
    finished: dict[str, float] = field(default_factory=dict)
    daemon_started: dict[str, float] = field(default_factory=dict)  # the joiners'
    errors: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)


class SwarmLab:
    """The network, the origin and its file; one ``run`` per strategy, then ``close``."""

    def __init__(self, cfg: SwarmConfig, workdir: Path):
        self.cfg = cfg
        self.workdir = workdir
        self.net = Network(cfg.prefix, cfg.subnet, cfg.mtu)
        try:
            self.origin_host = self.net.add_host("origin", cfg.origin_rate_bits)
            self.sched_host = self.net.add_host("sched")
            self.seed_host = self.net.add_host("seed", cfg.seed_rate)
            self.peer_hosts = [self.net.add_host(name, cfg.rate_of(name)) for name in cfg.peer_names()]
            self._start_origin()
        except BaseException:
            self.net.close()
            raise

    def _start_origin(self) -> None:
        from damselfly.sandbox.demo import sha256_of
        from damselfly.sandbox.origin import make_file

        root = self.workdir / "origin"
        root.mkdir(parents=True, exist_ok=True)
        self.file = make_file(root / "blob", self.cfg.size)
        self.digest = "sha256:" + sha256_of(self.file)
        argv = self.origin_host.argv(
            sys.executable, "-m", "damselfly.sandbox.origin", "--dir", str(root), "--host", self.origin_host.ip
        )
        self.origin = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.origin.stdout is not None
        line = self.origin.stdout.readline()
        if not line:
            raise DamselflyError(f"the origin did not start (exit {self.origin.wait()})")
        self.origin_address = f"{self.origin_host.ip}:{json.loads(line)['port']}"
        self.url = f"http://{self.origin_address}/blob"

    def _origin_stats(self, reset: bool = False) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(
            f"http://{self.origin_address}/__stats" + ("/reset" if reset else ""), method="POST" if reset else "GET"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def close(self) -> None:
        if getattr(self, "origin", None) is not None:
            if self.origin.stdout is not None:
                self.origin.stdout.close()
            try:
                os.killpg(self.origin.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.origin.wait()
        self.net.close()

    def __enter__(self) -> SwarmLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ----------------------------------------------------------------------------------

    def _env(self, host: NetHost, extra: dict[str, str], declare_rates: bool = True) -> dict[str, str]:
        """The lab's plumbing (where the process lives, the origin's subnet allowed), then ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
        env.update(
            {
                "DAMSELFLY_LOG__LEVEL": self.cfg.log_level,
                "DAMSELFLY_HOST__IP": host.ip,
                "DAMSELFLY_HOST__HOSTNAME": host.name,
                "DAMSELFLY_DAEMON__LISTEN_IP": host.ip,
                "DAMSELFLY_SCHEDULER__LISTEN_IP": host.ip,
                "DAMSELFLY_PROXY__ENABLED": "false",
                "DAMSELFLY_PLUGINS__AUTOLOAD": "false",
                # the origin lives on the lab's private subnet, which the source policy refuses by default
                "DAMSELFLY_SECURITY__SOURCES__ALLOW_NETWORKS": json.dumps([f"{self.cfg.subnet}.0/24"]),
            }
        )
        if declare_rates and host.rate_bits:
            env["DAMSELFLY_HOST__MAX_TX_BANDWIDTH"] = str(host.rate_bits // 8)
            env["DAMSELFLY_HOST__MAX_RX_BANDWIDTH"] = str(host.rate_bits // 8)
        env.update(extra)
        return env

    def _spawn_daemon(self, host: NetHost, run: _Run) -> cl.Proc:
        is_seed = host is self.seed_host
        extra = dict(run.profile.daemon_env)
        if is_seed and run.profile.seed_env:
            extra.update(run.profile.seed_env)
        extra.update(
            {
                "DAMSELFLY_DAEMON__DATA_DIR": str(run.work / host.name),
                "DAMSELFLY_DAEMON__SCHEDULERS": json.dumps([run.scheduler]),
                "DAMSELFLY_DAEMON__SEED": "true" if is_seed else "false",
            }
        )
        if run.trace is not None:
            run.trace.mkdir(parents=True, exist_ok=True)
            extra["DAMSELFLY_PLUGINS__LOAD"] = json.dumps(["damselfly.testing.swarmtrace"])
            extra["DAMSELFLY_SWARM_TRACE"] = str(run.trace / f"{host.name}.jsonl")
        env = self._env(host, extra, run.profile.declare_rates)
        proc = spawn(host, ["daemon"], env, run.work, host.name)
        run.procs[host.name] = proc
        return proc

    def run(self, profile: Profile, *, verify: bool = True, trace: Path | None = None) -> dict[str, Any]:
        """Every host downloads the file at once through the swarm; their times, the origin's bytes, the CPU.

        With churn the late hosts' daemons start during the downloads, and each host starts its
        download once its daemon is ready and the scheduler knows it; the killed hosts' daemons
        get SIGKILL (their process group) mid-download and are reported as ``left``, outside
        the ratios. A staying host's failed download raises. ``verify`` checks each staying
        host's copy against the file's sha256 (``correct_hosts``).

        ``cpu_seconds_download`` is the CPU (user and system) the seed and peer daemons spent
        from the start of the downloads to the last finish (a joiner's from when its daemon
        was ready, a killed host's to its kill); ``cpu_seconds_per_gib`` is that over the GiB
        delivered to peers (those that finished, x F). ``cpu_seconds`` is every process's
        CPU over the whole run, startup included.
        """
        import asyncio

        cfg = self.cfg
        work = self.workdir / profile.name
        shutil.rmtree(work, ignore_errors=True)
        late = set(cfg.late_names())
        procs: dict[str, cl.Proc] = {}
        try:
            env = self._env(self.sched_host, profile.scheduler_env, profile.declare_rates)
            procs["sched"] = spawn(self.sched_host, ["scheduler"], env, work, "sched")
            scheduler = cl.wait_ready([procs["sched"]], READY_TIMEOUT)["sched"]["address"]
            run = _Run(profile, work, scheduler, trace, procs, {})
            daemons = [self._spawn_daemon(h, run) for h in [self.seed_host, *self.peer_hosts] if h.name not in late]
            run.info.update(cl.wait_ready(daemons, READY_TIMEOUT))
            asyncio.run(_wait_hosts(scheduler, len(daemons)))
            self._origin_stats(reset=True)
            self.started_at = time.time()
            asyncio.run(self._downloads(run))
            origin = self._origin_stats()
            staying = [n for n in cfg.peer_names() if n not in run.left]
            failed = {n: run.errors[n] for n in staying if n in run.errors}
            if failed:
                name, why = next(iter(failed.items()))
                raise DamselflyError(f"{profile.name}: {len(failed)} downloads failed: {name}: {why}")
            correct = asyncio.run(self._verify(run, staying)) if verify else []
            cpu = sum((run.cpu_to[n] if n in run.left else cpu_times(p.popen.pid)).total for n, p in procs.items())
            alive = [n for n in ["seed", *cfg.peer_names()] if n in run.info and n not in run.left]
            metrics = {n: run.info[n]["metrics"] for n in alive}
            uploaded = {n: scrape(m, "dragonfly_dfdaemon_upload_traffic_bytes_total") for n, m in metrics.items()}
            busy = sum(scrape(m, "dragonfly_dfdaemon_upload_busy_total") for m in metrics.values())
            readers = sum(
                scrape(m, "dragonfly_dfdaemon_download_traffic_bytes_total", '{traffic_type="back_to_source"}') > 0
                for m in metrics.values()
            )
            announced, skipped = (
                sum(
                    scrape(m, "dragonfly_dfdaemon_sync_piece_total", f'{{outcome="{outcome}"}}')
                    for m in metrics.values()
                )
                for outcome in ("announced", "skipped")
            )
        finally:
            cl.stop_pids([p.popen.pid for p in procs.values()])
            for p in procs.values():
                p.popen.wait()
            if not os.environ.get("DAMSELFLY_KEEP_SWARM"):
                shutil.rmtree(work, ignore_errors=True)
        times = {n: run.finished[n] - run.started[n] for n in staying}
        summary = self._summary(times, origin["bytes"], uploaded)
        daemons = [n for n in run.cpu_from if n != "sched"]
        daemon_cpu = sum(run.cpu_to[n].total - run.cpu_from[n].total for n in daemons)
        summary["cpu_seconds"] = round(cpu, 1)
        summary["cpu_seconds_download"] = round(daemon_cpu, 2)
        summary["cpu_seconds_per_gib"] = round(daemon_cpu / (len(times) * cfg.size / GiB), 2)
        # the kernel's part (TCP, the veths, the bridge and tc run in the daemons' context here)
        daemon_sys = sum(run.cpu_to[n].system - run.cpu_from[n].system for n in daemons)
        summary["system_seconds_per_gib"] = round(daemon_sys / (len(times) * cfg.size / GiB), 2)
        summary["scheduler_cpu_seconds"] = round(run.cpu_to["sched"].total - run.cpu_from["sched"].total, 2)
        summary["correct_hosts"] = correct
        summary["busy_answers"] = int(busy)
        summary["source_readers"] = int(readers)  # staying daemons that read from the origin (shares: all)
        summary["sync_piece_messages"] = int(announced)
        summary["sync_pieces_skipped"] = int(skipped)  # the child's host had told us it holds them
        if cfg.late_hosts or cfg.killed_hosts:
            summary["joined"] = cfg.late_names()
            summary["left"] = run.left
            summary["joiners"] = {
                n: {
                    "daemon_started": round(run.daemon_started[n], 3),
                    "download_started": round(run.started[n], 3),
                    "seconds_from_common_start": round(run.finished[n], 3),
                    "seconds_from_own_start": round(run.finished[n] - run.started[n], 3),
                }
                for n in cfg.late_names()
                if n in run.finished
            }
        return summary

    async def _downloads(self, run: _Run) -> None:
        """The peers' downloads from one common start; late hosts join and killed hosts leave on time."""
        import asyncio

        from damselfly.sdk.client import Client

        cfg = self.cfg
        t_min = cfg.t_min()
        late = cfg.late_names()
        run.cpu_from = {n: cpu_times(p.popen.pid) for n, p in run.procs.items()}
        t0 = time.monotonic()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, t0 + fraction * t_min - time.monotonic()))

        async def download(name: str) -> None:
            run.started[name] = time.monotonic() - t0
            try:
                async with Client(run.info[name]["socket"]) as c:
                    await c.download(self.url, piece_length=cfg.piece_length)
                run.finished[name] = time.monotonic() - t0
            except DamselflyError as exc:
                run.errors[name] = str(exc)

        async def join(host: NetHost) -> None:
            await at(cfg.join_at)
            run.daemon_started[host.name] = time.monotonic() - t0
            proc = self._spawn_daemon(host, run)
            run.info.update(await asyncio.to_thread(cl.wait_ready, [proc], READY_TIMEOUT))
            await _wait_hosts(run.scheduler, ips=[host.ip])
            run.cpu_from[host.name] = cpu_times(proc.popen.pid)
            await download(host.name)

        tasks = {h.name: asyncio.create_task(download(h.name)) for h in self.peer_hosts if h.name not in late}

        async def leave() -> None:
            await at(cfg.kill_at)
            for name in cfg.killed_names():
                pid = run.procs[name].popen.pid
                run.cpu_to[name] = cpu_times(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                tasks[name].cancel()  # its client, before it sees the socket close
                run.left.append(name)

        others = [join(h) for h in self.peer_hosts if h.name in late]
        if cfg.killed_hosts:
            others.append(leave())
        results = await asyncio.gather(*tasks.values(), *others, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        for name, proc in run.procs.items():
            run.cpu_to.setdefault(name, cpu_times(proc.popen.pid))

    def _summary(self, times: dict[str, float], origin_bytes: int, uploaded: dict[str, float]) -> dict[str, Any]:
        """Ratios of each host's time (from its own start) to T_min and to its own bound, by host order."""
        cfg = self.cfg
        t_min = cfg.t_min()
        f = cfg.size
        names = [n for n in cfg.peer_names() if n in times]
        secs = [times[n] for n in names]
        own = [times[n] / cfg.own_t_min(n) for n in names]
        out: dict[str, Any] = {
            "seconds": [round(t, 3) for t in secs],
            "p50_seconds": round(quantile(secs, 0.5), 3),
            "max_seconds": round(max(secs), 3),
            "p50_ratio": round(quantile(secs, 0.5) / t_min, 3),
            "p90_ratio": round(quantile(secs, 0.9) / t_min, 3),
            "max_ratio": round(max(secs) / t_min, 3),
            "p50_own_ratio": round(quantile(own, 0.5), 3),
            "max_own_ratio": round(max(own), 3),
            "origin_ratio": round(origin_bytes / f, 3),
            "seed_upload_ratio": round(uploaded.get("seed", 0.0) / f, 3),
        }
        classes = cfg.classes()
        if len(classes) > 1:
            out["classes"] = {}
            for label, members in classes.items():
                mine = [n for n in members if n in times]
                if mine:
                    out["classes"][label] = {
                        "hosts": len(mine),
                        "rate_bits": cfg.rate_of(mine[0]),
                        "p50_ratio": round(quantile([times[n] for n in mine], 0.5) / t_min, 3),
                        "p50_own_ratio": round(quantile([times[n] / cfg.own_t_min(n) for n in mine], 0.5), 3),
                    }
        return out

    async def _verify(self, run: _Run, names: list[str]) -> list[str]:
        """Each host's copy against the file's sha256 (a local hit: the daemon checks what it stored)."""
        from damselfly.sdk.client import Client

        verified = []
        for name in names:
            async with Client(run.info[name]["socket"]) as c:
                await c.download(self.url, piece_length=self.cfg.piece_length, digest=self.digest)
            verified.append(name)
        return verified

    def direct(self) -> dict[str, Any]:
        """The same hosts, each fetching the whole file straight from the origin, all at once."""
        self._origin_stats(reset=True)
        procs = {
            h.name: subprocess.Popen(
                h.argv(sys.executable, "-c", _DIRECT, self.url),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for h in self.peer_hosts
        }
        try:
            for p in procs.values():
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise DamselflyError(f"a direct download did not start: {p.stderr.read() if p.stderr else ''}")
            origin_cpu = cpu_times(self.origin.pid).total
            t0 = time.time()
            for p in procs.values():
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            times = {}
            cpu = system = 0.0
            for name, p in procs.items():
                out, err = p.communicate(timeout=3600)
                if p.returncode != 0:
                    raise DamselflyError(f"a direct download failed: {err.strip().splitlines()[-1:]}")
                end, n, used, kernel = out.split()
                if int(n) != self.cfg.size:
                    raise DamselflyError(f"a direct download got {n} bytes, not {self.cfg.size}")
                times[name] = float(end) - t0
                cpu, system = cpu + float(used), system + float(kernel)
            origin_cpu = cpu_times(self.origin.pid).total - origin_cpu
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        summary = self._summary(times, self._origin_stats()["bytes"], {})
        # what the plain clients spent receiving (start-up included): the floor of a download's cost
        # on these emulated links, whose kernel work (veth, bridge, tc) runs in the processes' context
        gib = len(times) * self.cfg.size / GiB
        summary["cpu_seconds_per_gib"] = round(cpu / gib, 2)
        summary["system_seconds_per_gib"] = round(system / gib, 2)
        # and the origin's sending them: with the clients', what moving the bytes costs on these links
        summary["origin_cpu_seconds_per_gib"] = round(origin_cpu / gib, 2)
        return summary


async def _wait_hosts(scheduler: str, count: int = 0, ips: Sequence[str] = (), timeout: float = 30.0) -> None:
    """Until the scheduler has heard AnnounceHost from ``count`` daemons, and from one at each of ``ips``."""
    import asyncio

    import grpc
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(scheduler) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        while True:
            hosts = (await stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5)).hosts
            if len(hosts) >= count and set(ips) <= {h.ip for h in hosts}:
                return
            if time.monotonic() > deadline:
                raise DamselflyError(
                    f"the scheduler knows {len(hosts)} of {count} hosts ({', '.join(ips)}) after {timeout:.0f}s"
                )
            await asyncio.sleep(0.1)
