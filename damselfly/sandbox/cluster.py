"""A local cluster: a scheduler, a seed and N peer daemons as separate processes.

``damselfly cluster up --peers N --dir DIR`` writes ``DIR/cluster.json`` for
scripts and other tools; ``damselfly cluster down --dir DIR`` stops them all.

Every process gets a config file, ``DIR/config/NAME.yaml`` (``DAMSELFLY_CONFIG``; the
environment still overrides it). Every part runs on 127.0.0.1 and so do the origins a
local cluster is tried with, so that file allows loopback origins
(``security.sources.allow_loopback: true``), which the default policy refuses. With
``tls``, a fresh CA in ``DIR/tls`` issues each process a certificate (scheduler: role
scheduler; seed: peer and seed; peers: peer; ``client.pem``: client, for tools and tests
that call the scheduler or an upload server) and the files turn ``security.tls`` on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damselfly.core.errors import DamselflyError

READY_TIMEOUT = 60.0
LOOPBACK = "127.0.0.1"
CONFIG_NOTE = (
    "every part runs on 127.0.0.1, so its config (DIR/config/*.yaml) allows loopback origins "
    "(security.sources.allow_loopback: true), which the default policy refuses"
)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    ready_file: Path
    log: Path


def _spawn(args: list[str], env: dict[str, str], log: Path, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m damselfly ARGS`` in its own session, logging to ``log``; under ``prefix`` if given."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "damselfly", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its DAMSELFLY_ settings, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_") or k.startswith("DAMSELFLY_PROXY__")}
    base.update(extra or {})
    return base


def hostname_of(name: str) -> str:
    """The host name daemon ``name`` of a cluster announces (its certificate names it)."""
    return f"{socket.gethostname()}-{name}"


def roles_of(name: str) -> tuple[str, ...]:
    """The roles in the certificate of process ``name`` of a cluster."""
    if name.startswith("scheduler"):
        return ("scheduler",)
    if name == "seed":
        return ("peer", "seed")
    if name == "client":
        return ("client",)
    return ("peer",)


def config_path(directory: Path, name: str) -> Path:
    return directory / "config" / f"{name}.yaml"


def tls_files(directory: Path, name: str) -> dict[str, str]:
    """``security.tls`` of process ``name`` of a cluster with TLS (its files in DIR/tls)."""
    d = directory / "tls"
    return {"ca": str(d / "ca.pem"), "cert": str(d / f"{name}.pem"), "key": str(d / f"{name}-key.pem")}


def init_tls(directory: Path, names: list[str]) -> None:
    """A fresh CA in DIR/tls and a certificate for each process in ``names`` (and ``client``);
    every one names 127.0.0.1, a daemon's also its own host name and no other: the scheduler
    lets a certificate announce only the hosts it names (``localhost`` in all of them would let
    any member announce a host ``127.0.0.1-localhost``)."""
    from damselfly.security import certs

    d = directory / "tls"
    if (d / certs.CA_CERT).exists() or (d / certs.CA_KEY).exists():
        (d / certs.CA_CERT).unlink(missing_ok=True)
        (d / certs.CA_KEY).unlink(missing_ok=True)
    certs.init_ca(d, name=f"damselfly cluster CA ({directory.name})", days=30)
    for name in [*names, "client"]:
        dns = [] if name.startswith("scheduler") or name == "client" else [hostname_of(name)]
        certs.issue(d, d, name, ips=[LOOPBACK], dns=dns, roles=roles_of(name), days=30)


def write_config(
    directory: Path, name: str, *, tls: bool, allow_loopback: bool, schedulers: list[str] | None = None
) -> Path:
    """Write DIR/config/NAME.yaml, the config file of process ``name`` (with ``schedulers``:
    ``daemon.schedulers`` too, for the client's, which tools such as ``preheat`` read)."""
    import yaml

    security: dict[str, Any] = {"sources": {"allow_loopback": allow_loopback}}
    if tls:
        security["tls"] = tls_files(directory, name)
    config: dict[str, Any] = {"security": security}
    if schedulers:
        config["daemon"] = {"schedulers": schedulers}
    path = config_path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = "# written by `damselfly cluster up`: " + CONFIG_NOTE.replace("DIR/config/*.yaml", "this file") + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(note + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
    return path


def _with_config(directory: Path, name: str, env: dict[str, str]) -> dict[str, str]:
    path = config_path(directory, name)
    if path.exists():
        env = {**env}
        env.setdefault("DAMSELFLY_CONFIG", str(path))  # a caller's own config file wins
    return env


def daemon_env(directory: Path, name: str, scheduler: str | list[str], base: dict[str, str]) -> dict[str, str]:
    """The environment of daemon ``name`` (``seed`` or ``peerN``) of a cluster."""
    env = _with_config(directory, name, base)
    env.update(
        {
            "DAMSELFLY_DAEMON__DATA_DIR": str(directory / name),
            "DAMSELFLY_DAEMON__SCHEDULERS": json.dumps(scheduler if isinstance(scheduler, list) else [scheduler]),
            "DAMSELFLY_DAEMON__SEED": "true" if name == "seed" else "false",
            "DAMSELFLY_HOST__HOSTNAME": hostname_of(name),
        }
    )
    env.setdefault("DAMSELFLY_DAEMON__ANNOUNCE_INTERVAL", "30")
    env.setdefault("DAMSELFLY_LOG__LEVEL", "INFO")
    return env


def start_daemon(directory: Path, name: str, scheduler: str | list[str], base: dict[str, str]) -> Proc:
    """Start one daemon of a cluster (again, after a stop: same data dir, same host id)."""
    ready_file = directory / "run" / f"{name}.json"
    ready_file.unlink(missing_ok=True)
    log = directory / "logs" / f"{name}.log"
    return Proc(
        name,
        _spawn(["daemon", "--ready-file", str(ready_file)], daemon_env(directory, name, scheduler, base), log),
        ready_file,
        log,
    )


def wait_ready(procs: list[Proc], timeout: float = READY_TIMEOUT) -> dict[str, dict[str, Any]]:
    return _wait_ready(procs, timeout)


def _wait_ready(procs: list[Proc], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    ready: dict[str, dict[str, Any]] = {}
    while len(ready) < len(procs):
        for p in procs:
            if p.name in ready:
                continue
            if p.ready_file.exists():
                ready[p.name] = json.loads(p.ready_file.read_text())
                continue
            if p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace").strip().splitlines()[-5:]
                raise DamselflyError(f"{p.name} exited with {p.popen.returncode}: {' | '.join(tail)}")
        if time.monotonic() > deadline:
            missing = [p.name for p in procs if p.name not in ready]
            raise DamselflyError(f"not ready after {timeout:.0f}s: {', '.join(missing)}")
        time.sleep(0.05)
    return ready


def up(directory: Path, peers: int, **kwargs: Any) -> dict[str, Any]:
    """Start the cluster, wait until every process is ready, write and return cluster.json."""
    info, _ = start(directory, peers, **kwargs)
    return info


def start(
    directory: Path,
    peers: int,
    *,
    seed: bool = True,
    env: dict[str, str] | None = None,
    peer_env: dict[int, dict[str, str]] | None = None,
    timeout: float = READY_TIMEOUT,
    schedulers: int = 1,
    tls: bool = False,
    allow_loopback: bool = True,
) -> tuple[dict[str, Any], list[Proc]]:
    """Like ``up``, and also hands back the processes (for callers that reap them).

    ``tls``: mutual TLS everywhere, with a fresh CA in DIR/tls. ``allow_loopback``: the
    processes' config allows origins on loopback (the default here: see the module)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)
    (directory / "run").mkdir(exist_ok=True)
    base = base_env(env)
    sched_names = ["scheduler" if i == 0 else f"scheduler{i + 1}" for i in range(schedulers)]
    names = (["seed"] if seed else []) + [f"peer{i}" for i in range(1, peers + 1)]
    if tls:
        init_tls(directory, sched_names + names)
    for name in [*sched_names, *names, "client"]:
        write_config(directory, name, tls=tls, allow_loopback=allow_loopback)
    started: list[Proc] = []
    try:
        scheds: list[Proc] = []
        for name in sched_names:
            ready_file = directory / "run" / f"{name}.json"
            ready_file.unlink(missing_ok=True)
            log = directory / "logs" / f"{name}.log"
            args = ["scheduler", "--ready-file", str(ready_file)]
            sched = Proc(name, _spawn(args, _with_config(directory, name, base), log), ready_file, log)
            scheds.append(sched)
            started.append(sched)
        sched_infos = _wait_ready(scheds, timeout)
        listed = [{"name": s.name, **sched_infos[s.name]} for s in scheds]
        addresses = [s["address"] for s in listed]
        write_config(directory, "client", tls=tls, allow_loopback=allow_loopback, schedulers=addresses)
        daemons: list[Proc] = []
        for idx, name in enumerate(names):
            extra = (peer_env or {}).get(idx if seed else idx + 1, {})
            p = start_daemon(directory, name, addresses, {**base, **extra})
            daemons.append(p)
            started.append(p)
        infos = _wait_ready(daemons, timeout)
        cluster = {
            "dir": str(directory),
            "scheduler": listed[0]["address"],
            "scheduler_pid": listed[0]["pid"],
            "scheduler_metrics": listed[0]["metrics"],
            "schedulers": listed,
            "daemons": [{"name": p.name, **infos[p.name]} for p in daemons],
            "allow_loopback": allow_loopback,
            # the files a tool or test uses to call the scheduler or an upload server (role client)
            "tls": {**tls_files(directory, "client"), "config": str(config_path(directory, "client"))} if tls else None,
        }
        tmp = directory / "cluster.json.tmp"
        tmp.write_text(json.dumps(cluster, indent=2))
        os.replace(tmp, directory / "cluster.json")
        return cluster, started
    except BaseException:
        stop_pids([p.popen.pid for p in started])
        for p in started:
            p.popen.wait()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def down(directory: Path, grace: float = 5.0) -> int:
    """Stop every process of the cluster in ``directory``; returns how many were running."""
    path = directory / "cluster.json"
    if not path.exists():
        raise DamselflyError(f"no cluster.json in {directory}")
    cluster = json.loads(path.read_text())
    scheds = cluster.get("schedulers") or [{"pid": cluster["scheduler_pid"]}]
    pids = [int(d["pid"]) for d in cluster["daemons"]] + [int(s["pid"]) for s in scheds]
    running = [pid for pid in pids if _alive(pid)]
    stop_pids(running, grace)
    return len(running)


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM every process group at once, then SIGKILL what is left after ``grace``."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
