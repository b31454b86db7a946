"""The ``damselfly`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import gc
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from damselfly import __version__
from damselfly.config import Settings, load_settings
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PeerError
from damselfly.core.units import format_size, parse_duration, parse_size


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"damselfly: error: {message}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), **overrides)
    except DamselflyError as exc:
        _fail(str(exc), 2)
        raise AssertionError("unreachable") from None


def _logs(settings: Settings, quiet: bool = False) -> None:
    from damselfly.telemetry import logs

    logs.setup("WARNING" if quiet else settings.log.level, settings.log.json_format)


def _write_ready(path: str | None, info: dict[str, Any]) -> None:
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def quiet_gc() -> None:
    """For a service process that holds a large, long-lived state (the scheduler's hosts,
    tasks and peers): what exists at start-up is never collected, and the young generation
    is collected after 50,000 allocations instead of 700, so that state is rescanned less
    often. (In one 10,000-peer load run, collection switched off gave 15% more decisions a
    second; later runs put the difference within this VM's noise.)"""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service until SIGTERM or SIGINT, then let it stop cleanly; errors are one line."""

    async def runner() -> None:
        task = asyncio.ensure_future(main())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(runner())
    except DamselflyError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(), default=None, help="YAML config file (else $DAMSELFLY_CONFIG).")
@click.version_option(__version__, prog_name="damselfly")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """damselfly: peer-to-peer distribution that speaks Dragonfly v2."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# -- services ----------------------------------------------------------------------


@cli.command()
@click.option("--seed", is_flag=True, default=None, help="Run as a seed peer.")
@click.option("--ready-file", default=None, help="Write the bound addresses here as JSON once ready.")
@click.pass_context
def daemon(ctx: click.Context, seed: bool | None, ready_file: str | None) -> None:
    """Run a peer daemon (unix socket for local clients, upload gRPC, Vortex piece server)."""
    settings = _settings(ctx)
    if seed:
        settings = settings.model_copy(update={"daemon": settings.daemon.model_copy(update={"seed": True})})
    _logs(settings)
    from damselfly.daemon.daemon import Daemon

    async def main() -> None:
        d = Daemon(settings)
        await d.start()
        try:
            ip = settings.daemon.listen_ip
            _write_ready(
                ready_file,
                {
                    "host_id": d.host_id,
                    "pid": os.getpid(),
                    "seed": d.is_seed,
                    "socket": str(d.socket_path),
                    "upload": f"{ip}:{d.upload_port}",
                    "piece_port": f"{ip}:{d.piece_port}",
                    "metrics": f"{ip}:{d.metrics_port}",
                    "proxy": f"{ip}:{d.proxy.port}" if d.proxy is not None else None,
                    "data_dir": str(settings.daemon.data_dir),
                },
            )
            await asyncio.Event().wait()
        finally:
            await d.stop()

    _run_service(main)


@cli.command()
@click.option("--ready-file", default=None, help="Write the bound address here as JSON once ready.")
@click.pass_context
def scheduler(ctx: click.Context, ready_file: str | None) -> None:
    """Run the scheduler (scheduler.v2.Scheduler over gRPC)."""
    settings = _settings(ctx)
    _logs(settings)
    from damselfly.scheduler.service import start_scheduler

    async def main() -> None:
        server = await start_scheduler(settings)
        quiet_gc()
        try:
            _write_ready(
                ready_file,
                {
                    "address": server.address,
                    "pid": os.getpid(),
                    "metrics": f"{settings.scheduler.listen_ip}:{server.metrics_port}",
                },
            )
            await asyncio.Event().wait()
        finally:
            await server.stop()

    _run_service(main)


# -- get --------------------------------------------------------------------------


class _Bar:
    """A one-line progress bar on stderr: bytes, rate, ETA, and where the bytes came from."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and p.done_bytes != p.content_length:
            return
        self.last = now
        total = p.content_length if p.content_length >= 0 else 0
        frac = p.done_bytes / total if total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = p.rate
        eta = (total - p.done_bytes) / rate if rate > 0 and total else 0
        sys.stderr.write(
            f"\r[{bar}] {format_size(p.done_bytes)}/{format_size(total)} {format_size(rate)}/s "
            f"ETA {eta:4.0f}s  peers {format_size(p.peer_bytes)} source {format_size(p.source_bytes)}"
            f" local {format_size(p.local_bytes)} "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _parse_headers(values: tuple[str, ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for h in values:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            _fail(f"bad header {h!r}: expected 'Name: value'", 2)
        key = name.strip()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


def _source_options(
    region: str,
    endpoint: str,
    access_key_id: str,
    access_key_secret: str,
    session_token: str,
    credential_path: str,
    predefined_acl: str,
    hdfs_token: str,
    hf_token: str,
    hf_revision: str,
) -> dict[str, dict[str, str]]:
    """dfget's --storage-*, --hdfs-* and --hf-* flags as the Download's source option messages."""
    groups = {
        "object_storage": {
            "region": region,
            "endpoint": endpoint,
            "access_key_id": access_key_id,
            "access_key_secret": access_key_secret,
            "session_token": session_token,
            "credential_path": credential_path,
            "predefined_acl": predefined_acl,
        },
        "hdfs": {"delegation_token": hdfs_token},
        "hugging_face": {"token": hf_token, "revision": hf_revision},
    }
    return {name: {k: v for k, v in values.items() if v} for name, values in groups.items() if any(values.values())}


def _relative(base: str, url: str) -> str:
    """Where an entry of a recursive download goes under the output directory (never outside it)."""
    base_path = urlsplit(base).path.rstrip("/")
    path = urlsplit(url).path
    rel = path[len(base_path) :] if path.startswith(base_path) else path.rsplit("/", 1)[-1].rpartition("@")[2]
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidArgument(f"entry {url!r} does not lie under {base!r}")
    return "/".join(parts)


def _nothing_listens(path: Path) -> bool:
    """Whether no daemon answers on the unix socket ``path``: it is absent, or a stale file."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:
        return False  # something is there (another user's daemon, a busy one): the client says what
    finally:
        probe.close()
    return False


def _embedded_settings(settings: Settings, root: Path) -> Settings:
    """The user's settings for a daemon that serves one ``get``: its data dir and socket in
    ``root``, never a seed, no proxy, metrics on a free port. With schedulers it joins their
    swarm as configured (listen address, ports, TLS); without, nothing can find its servers,
    so they listen on loopback at free ports."""
    daemon = settings.daemon
    update: dict[str, Any] = {"data_dir": root, "socket": root / "dfdaemon.sock", "seed": False, "metrics_port": 0}
    if not daemon.schedulers:
        update.update(listen_ip="127.0.0.1", upload_port=0, piece_port=0)
    return settings.model_copy(
        update={
            "daemon": daemon.model_copy(update=update),
            "proxy": settings.proxy.model_copy(update={"enabled": False}),
        }
    )


@contextlib.asynccontextmanager
async def _embedded_daemon(settings: Settings, missing: Path) -> AsyncIterator[Path]:
    """A daemon in this process for one ``get`` (as ``p2p::`` starts one); yields its socket.

    Its directory is new, private (0700) and removed with everything in it when the download
    ends: inside the configured data dir when that exists and is this user's to write (the
    disk meant for task data), else in the system's temp dir. Downloads go through its unix
    socket, so they are admitted as any local client's."""
    from damselfly.daemon.daemon import Daemon

    def failed(exc: BaseException) -> PeerError:
        return PeerError(f"no daemon at {missing}, and an embedded one could not start: {exc}")

    parent = settings.daemon.data_dir
    usable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    try:
        root = Path(tempfile.mkdtemp(prefix="embedded-get-", dir=parent if usable else None))
    except OSError as exc:
        raise failed(exc) from None
    try:
        try:
            daemon = Daemon(_embedded_settings(settings, root))
        except (DamselflyError, OSError) as exc:
            raise failed(exc) from None
        try:
            await daemon.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # what it started so far; the directory goes below
                await daemon.stop()
            if isinstance(exc, DamselflyError | OSError):
                raise failed(exc) from None
            raise
        try:
            yield daemon.socket_path
        finally:
            await daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _embedded_logs(settings: Settings) -> None:
    """The CLI's log sink while an embedded daemon serves a get: as ``_logs(quiet=True)``, less
    the daemon's own line for a failed download, which this command's error already says."""
    from damselfly.telemetry import logs

    def keep(record: Any) -> bool:
        return not (record["name"] == "damselfly.daemon.download" and record["message"].startswith("download failed: "))

    logs.setup("WARNING", settings.log.json_format, keep=keep)


def _run_download(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a download; SIGTERM, like Ctrl-C, cancels it so that an embedded daemon stops cleanly."""

    async def runner() -> Any:
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    try:
        return asyncio.run(runner())
    except DamselflyError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except asyncio.CancelledError:
        _fail("terminated", 143)


@cli.command()
@click.argument("url")
@click.option("-O", "--output", required=True, type=click.Path(), help="Where to write the content (-r: a directory).")
@click.option("-H", "--header", "headers", multiple=True, help="Request header 'Name: value' (repeatable).")
@click.option("--digest", default="", help="Verify the whole content, e.g. sha256:HEX.")
@click.option("--tag", default="", help="Tag: different tags are different tasks.")
@click.option("--application", default="", help="Application name, part of the task id.")
@click.option("--filtered-query-param", "filtered", multiple=True, help="Query parameter left out of the task id.")
@click.option("--piece-length", default="", help="Fixed piece length (64KiB to 64MiB; upstream allows 4MiB and up).")
@click.option("--priority", type=click.IntRange(0, 6), default=0, help="Priority level 0-6.")
@click.option("--timeout", type=float, default=0.0, help="Give up after this many seconds (0: never).")
@click.option("--no-progress", is_flag=True, help="Print nothing but errors (no progress bar, summary or note).")
@click.option("--disable-back-to-source", is_flag=True, help="Never let this download read the origin.")
@click.option("-r", "--recursive", is_flag=True, help="URL is a directory (prefix): download every file under it.")
@click.option("--include", "includes", multiple=True, help="With -r: only paths matching this glob (repeatable).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, help="With -r: files downloaded at once.")
@click.option("--storage-region", default="", help="Object storage region.")
@click.option("--storage-endpoint", default="", help="Object storage endpoint URL.")
@click.option("--storage-access-key-id", default="", help="Object storage access key id.")
@click.option("--storage-access-key-secret", default="", help="Object storage secret access key.")
@click.option("--storage-session-token", default="", help="Object storage session token.")
@click.option("--storage-credential-path", default="", help="Object storage credential file (GCS).")
@click.option("--storage-predefined-acl", default="", help="Object storage predefined ACL.")
@click.option("--hdfs-delegation-token", default="", help="HDFS delegation token.")
@click.option("--hf-token", default="", help="Hugging Face access token.")
@click.option("--hf-revision", default="", help="Hugging Face revision (branch, tag or commit).")
@click.option(
    "--socket", "socket_path", default=None, help="Daemon socket (else from config); a named one must be running."
)
@click.option(
    "--no-embedded",
    is_flag=True,
    help="With no daemon at the configured socket, fail instead of starting an embedded one for this download.",
)
@click.pass_context
def get(
    ctx: click.Context,
    url: str,
    output: str,
    headers: tuple[str, ...],
    digest: str,
    tag: str,
    application: str,
    filtered: tuple[str, ...],
    piece_length: str,
    priority: int,
    timeout: float,
    no_progress: bool,
    disable_back_to_source: bool,
    recursive: bool,
    includes: tuple[str, ...],
    concurrency: int,
    storage_region: str,
    storage_endpoint: str,
    storage_access_key_id: str,
    storage_access_key_secret: str,
    storage_session_token: str,
    storage_credential_path: str,
    storage_predefined_acl: str,
    hdfs_delegation_token: str,
    hf_token: str,
    hf_revision: str,
    socket_path: str | None,
    no_embedded: bool,
) -> None:
    """Download URL through the local daemon into OUTPUT (written to a temp file, then renamed).

    With no daemon at the configured socket, one started inside this command serves the
    download (with the config's schedulers, if any, it joins their swarm) and stops after
    it, leaving nothing behind; --no-embedded fails instead. A --socket named on the
    command line is never replaced: its daemon must be running."""
    from damselfly.plugin_manager import build_plugins
    from damselfly.sdk.client import Client

    settings = _settings(ctx)
    _logs(settings, quiet=True)
    try:
        plen = parse_size(piece_length) if piece_length else 0
        build_plugins(settings).source_for(url)  # a bad url or scheme is said before any socket is looked for
    except DamselflyError as exc:
        _fail(str(exc), 2)
    if includes and not recursive:
        _fail("--include needs -r/--recursive", 2)
    if recursive and digest:
        _fail("--digest names one file; it cannot go with -r/--recursive", 2)
    hdrs = _parse_headers(headers)
    options = _source_options(
        storage_region,
        storage_endpoint,
        storage_access_key_id,
        storage_access_key_secret,
        storage_session_token,
        storage_credential_path,
        storage_predefined_acl,
        hdfs_delegation_token,
        hf_token,
        hf_revision,
    )
    common: dict[str, Any] = {
        "headers": hdrs,
        "tag": tag,
        "application": application,
        "filtered_query_params": list(filtered),
        "piece_length": plen,
        "priority": priority,
        "timeout": timeout or None,
        "disable_back_to_source": disable_back_to_source,
        "source_options": options,
    }
    target = Path(socket_path) if socket_path else settings.socket_path
    embedded = not (socket_path or no_embedded) and _nothing_listens(target)
    if embedded:
        _embedded_logs(settings)

    def daemon_socket() -> contextlib.AbstractAsyncContextManager[Path]:
        return _embedded_daemon(settings, target) if embedded else contextlib.nullcontext(target)

    if recursive:
        _get_recursive(daemon_socket, url, Path(output), includes, concurrency, common)
    else:
        bar = _Bar(not no_progress)

        async def main() -> Any:
            try:
                async with daemon_socket() as path, Client(path) as c:
                    return await c.download(url, output, digest=digest, on_progress=bar, **common)
            finally:
                bar.close()

        result = _run_download(main)
        if not no_progress:
            click.echo(
                f"{result.output}: {format_size(result.content_length)} in {result.seconds:.2f}s "
                f"(peers {format_size(result.peer_bytes)}, source {format_size(result.source_bytes)}, "
                f"local {format_size(result.local_bytes)}) task {result.task_id}",
                err=True,
            )
    if embedded and not no_progress:
        click.echo(
            f"damselfly: no daemon was running at {target}: an embedded one served this download and stopped "
            "(`damselfly daemon` keeps one running, to share with peers)",
            err=True,
        )


def _get_recursive(
    daemon_socket: Callable[[], contextlib.AbstractAsyncContextManager[Path]],
    url: str,
    out_dir: Path,
    includes: tuple[str, ...],
    concurrency: int,
    common: dict[str, Any],
) -> None:
    """dfget --recursive: list through the daemon, then download each file, ``concurrency`` at a time."""
    from damselfly.sdk.client import Client

    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"output {str(out_dir)!r} exists and is not a directory", 2)

    async def main() -> list[tuple[str, Any]]:
        async with daemon_socket() as path, Client(path) as c:
            entries = await c.list_entries(
                url, headers=common["headers"], source_options=common["source_options"], timeout=common["timeout"] or 60
            )
            files = []
            for e in entries:
                if e.is_dir:
                    continue
                rel = _relative(url, e.url)
                if includes and not any(fnmatch.fnmatchcase(rel, g) for g in includes):
                    continue
                files.append((e.url, rel))
            if not files:
                raise NotFound(f"no files under {url}" + (f" match {', '.join(includes)}" if includes else ""))
            limit = asyncio.Semaphore(concurrency)

            async def one(entry_url: str, rel: str) -> tuple[str, Any]:
                async with limit:
                    target = out_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    return rel, await c.download(entry_url, target, **common)

            return list(await asyncio.gather(*(one(u, r) for u, r in files)))

    results = _run_download(main)
    total = sum(r.content_length for _, r in results)
    peers = sum(r.peer_bytes for _, r in results)
    source = sum(r.source_bytes for _, r in results)
    click.echo(
        f"{out_dir}: {len(results)} files, {format_size(total)} (peers {format_size(peers)}, "
        f"source {format_size(source)})",
        err=True,
    )


# -- tasks ----------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """The tasks the local daemon holds."""


def _client_call(ctx: click.Context, socket_path: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
    from damselfly.sdk.client import Client

    settings = _settings(ctx)

    async def call() -> Any:
        async with Client(socket_path or settings.socket_path) as c:
            return await getattr(c, method)(*args, **kwargs)

    try:
        return asyncio.run(call())
    except DamselflyError as exc:
        _fail(str(exc))


@tasks.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def tasks_ls(ctx: click.Context, as_json: bool, socket_path: str | None) -> None:
    """List the daemon's tasks: id, size, and whether it is complete."""
    rows = _client_call(ctx, socket_path, "list_tasks")
    for t in rows:
        done = t.HasField("finished_at")
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "task_id": t.task_id,
                        "content_length": t.content_length,
                        "piece_length": t.piece_length,
                        "finished": done,
                    }
                )
            )
        else:
            click.echo(f"{t.task_id}  {format_size(t.content_length):>10}  {'complete' if done else 'partial'}")


@tasks.command("rm")
@click.argument("task_id")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def tasks_rm(ctx: click.Context, task_id: str, socket_path: str | None) -> None:
    """Delete a task from the daemon (and tell the scheduler)."""
    _client_call(ctx, socket_path, "delete_task", task_id)
    click.echo(f"deleted {task_id}")


@cli.group()
def cache() -> None:
    """Persistent cache tasks: files put into the swarm by hand (Dragonfly's dfcache)."""


@cache.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--ttl", default="1h", help="How long the replicas keep it, e.g. 30m, 2h, 7d.")
@click.option("--replicas", type=click.IntRange(1, 100), default=1, help="Hosts that keep a copy (this one included).")
@click.option("--tag", default="", help="Tag: the same file under another tag is another task.")
@click.option("--application", default="", help="Application name, part of the task id.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def cache_import(
    ctx: click.Context,
    path: str,
    ttl: str,
    replicas: int,
    tag: str,
    application: str,
    as_json: bool,
    socket_path: str | None,
) -> None:
    """Import PATH; prints the task id that `damselfly cache export` takes on any peer."""
    try:
        seconds = parse_duration(ttl)
    except DamselflyError as exc:
        _fail(str(exc), 2)
    result = _client_call(
        ctx,
        socket_path,
        "cache_import",
        os.path.abspath(path),
        ttl=seconds,
        replicas=replicas,
        tag=tag,
        application=application,
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["task_id"])
    if len(result["replicas"]) < replicas:
        click.echo(f"warning: only {len(result['replicas'])} of {replicas} replicas could be placed", err=True)


@cache.command("export")
@click.argument("task_id")
@click.option("-O", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the content.")
@click.option("--timeout", type=float, default=0.0, help="Give up after this many seconds (0: never).")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def cache_export(ctx: click.Context, task_id: str, output: str, timeout: float, socket_path: str | None) -> None:
    """Write cache task TASK_ID to OUTPUT, from the peers that keep it."""
    r = _client_call(ctx, socket_path, "cache_export", task_id, os.path.abspath(output), timeout=timeout or None)
    click.echo(f"{r.output}: {format_size(r.content_length)} (peers {format_size(r.peer_bytes)})", err=True)


@cache.command("stat")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def cache_stat(ctx: click.Context, task_id: str, as_json: bool, socket_path: str | None) -> None:
    """What the swarm knows of cache task TASK_ID."""
    t = _client_call(ctx, socket_path, "cache_stat", task_id)
    info = {
        "task_id": t.id,
        "url": t.url,
        "content_length": t.content_length,
        "piece_count": t.piece_count,
        "peer_count": t.peer_count,
        "state": t.state,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    for k, v in info.items():
        click.echo(f"{k}: {v}")


@cli.command()
@click.argument("url")
@click.option(
    "--scope",
    type=click.Choice(["single_seed_peer", "all_seed_peers", "all_peers"]),
    default="single_seed_peer",
    help="Which hosts get it.",
)
@click.option("--platform", default="linux/amd64", help="Image platform, os/arch[/variant].")
@click.option("--username", default="", help="Registry username.")
@click.option("--password", default="", help="Registry password.")
@click.option("-H", "--header", "headers", multiple=True, help="Request header 'Name: value' (repeatable).")
@click.option("--tag", default="", help="Task tag.")
@click.option("--application", default="", help="Task application.")
@click.option("--ip", "ips", multiple=True, help="Only hosts with this IP (repeatable).")
@click.option("--timeout", type=float, default=3600.0, help="Seconds for the whole preheat.")
@click.option("--scheduler", "scheduler_address", default=None, help="Scheduler host:port (else the first configured).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer report as JSON.")
@click.pass_context
def preheat(
    ctx: click.Context,
    url: str,
    scope: str,
    platform: str,
    username: str,
    password: str,
    headers: tuple[str, ...],
    tag: str,
    application: str,
    ips: tuple[str, ...],
    timeout: float,
    scheduler_address: str | None,
    as_json: bool,
) -> None:
    """Put an image (oci://REGISTRY/REPO:TAG) or a file (any url) on the swarm's hosts ahead of use."""
    import grpc
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

    from damselfly.rpc.wire import duration

    settings = _settings(ctx)
    address = scheduler_address or (settings.daemon.schedulers[0] if settings.daemon.schedulers else None)
    if not address:
        _fail("no scheduler: pass --scheduler HOST:PORT or set daemon.schedulers", 2)
    hdrs = _parse_headers(headers)
    image = url.startswith("oci://") or ("/v2/" in url and "/manifests/" in url)
    common = {"url": url, "tag": tag, "application": application, "header": hdrs}

    async def main() -> dict[str, Any]:
        from damselfly.security import tls

        # mutual TLS with security.tls (a certificate with role client): preheat is an operator's act
        async with tls.grpc_channel(address, settings.security.tls) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            if not image:
                await stub.PreheatFile(
                    scheduler_pb2.PreheatFileRequest(scope=scope, ips=list(ips), timeout=duration(timeout), **common),
                    timeout=timeout + 30,
                )
                return {"url": url, "scope": scope}
            auth = {"username": username, "password": password, "platform": platform}
            await stub.PreheatImage(
                scheduler_pb2.PreheatImageRequest(
                    scope=scope, ips=list(ips), timeout=duration(timeout), **common, **auth
                ),
                timeout=timeout + 30,
            )
            stat = await stub.StatImage(scheduler_pb2.StatImageRequest(**common, **auth), timeout=120)
            return {
                "url": url,
                "scope": scope,
                "layers": [{"url": layer.url, "finished": layer.is_finished} for layer in stat.image.layers],
                "hosts": {p.hostname: len(p.cached_layers) for p in stat.peers},
            }

    try:
        report = asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        hint = ""
        if exc.code() is grpc.StatusCode.UNAVAILABLE and not settings.security.tls.enabled:
            hint = " (if the scheduler requires mutual TLS, set security.tls to a client certificate)"
        _fail(f"preheat failed: {exc.details()}{hint}")
    except DamselflyError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(report))
        return
    for layer in report.get("layers", []):
        click.echo(f"{'done' if layer['finished'] else 'MISSING'}  {layer['url']}")
    for host, n in report.get("hosts", {}).items():
        click.echo(f"{host}: {n} blobs cached")
    click.echo(f"preheated {url} ({scope})")


@cli.command("runtime-config")
@click.argument("runtime", type=click.Choice(["containerd", "skopeo", "podman", "nydus"]))
@click.option("--proxy", "proxy_address", required=True, help="The local daemon's proxy, host:port.")
@click.option("--registry", default="docker.io", help="The registry to mirror (host[:port]).")
def runtime_config(runtime: str, proxy_address: str, registry: str) -> None:
    """Print the snippet that points RUNTIME's pulls at the daemon's proxy (registry mirror)."""
    click.echo(runtime_snippet(runtime, proxy_address, registry), nl=False)


def runtime_snippet(runtime: str, proxy_address: str, registry: str) -> str:
    host = registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    if registry.startswith("http://"):
        upstream = registry.rstrip("/")  # a plain-HTTP registry (a local one)
    else:
        upstream = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
    plain = upstream.startswith("http://")
    if runtime == "containerd":
        return (
            f'# /etc/containerd/certs.d/{host}/hosts.toml  (config_path = "/etc/containerd/certs.d")\n'
            f'server = "{upstream}"\n\n'
            f'[host."http://{proxy_address}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            '  [host."http://{0}".header]\n'.format(proxy_address)
            + f'    X-Dragonfly-Registry = ["{upstream}"]\n'
        )
    if runtime in ("skopeo", "podman"):
        return (
            "# /etc/containers/registries.conf (or ~/.config/containers/registries.conf)\n"
            f'[[registry]]\nprefix = "{host}"\nlocation = "{host}"\n' + ("insecure = true\n" if plain else "") + "\n"
            f'[[registry.mirror]]\nlocation = "{proxy_address}"\ninsecure = true\n'
        )
    mirror = {
        "host": f"http://{proxy_address}",
        "auth_through": False,
        "headers": {"X-Dragonfly-Registry": upstream},
        "ping_url": f"http://{proxy_address}/server/ping",
    }
    backend = {"device": {"backend": {"type": "registry", "config": {"mirrors": [mirror]}}}}
    return "# nydusd configuration: the registry backend's mirrors\n" + json.dumps(backend, indent=2) + "\n"


@cli.command("gc")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def gc_command(ctx: click.Context, as_json: bool, socket_path: str | None) -> None:
    """Run the daemon's garbage collection now (task TTL, quota and watermarks)."""
    report = _client_call(ctx, socket_path, "collect_garbage")
    if as_json:
        click.echo(json.dumps(report))
        return
    for task_id, why in report["removed"].items():
        click.echo(f"removed {task_id}: {why}")
    for task_id in report["kept_in_use"]:
        click.echo(f"kept {task_id}: in use")
    click.echo(
        f"freed {format_size(report['freed_bytes'])}; {format_size(report['used_bytes'])} stored "
        f"(high watermark {format_size(report['limit_bytes'])})"
    )


# -- plugins and config ------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per plugin.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List every loaded plugin, its kind and where it came from."""
    from damselfly.plugin_manager import build_plugins

    settings = _settings(ctx)
    try:
        infos = build_plugins(settings).info()
    except DamselflyError as exc:
        _fail(str(exc))
    if as_json:
        for i in infos:
            click.echo(json.dumps({"name": i.name, "kind": i.kind, "origin": i.origin, "unavailable": i.unavailable}))
        return
    click.echo(f"{'NAME':<16}{'KIND':<12}{'ORIGIN':<40}STATUS")
    for i in infos:
        click.echo(
            f"{i.name:<16}{i.kind:<12}{i.origin:<40}{'unavailable: ' + i.unavailable if i.unavailable else 'ok'}"
        )


@cli.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective configuration (defaults, YAML, env and flags merged)."""
    settings = _settings(ctx)
    data = settings.model_dump(mode="json", by_alias=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@config.command("reference")
def config_reference() -> None:
    """Print every setting with its env variable, default and meaning (Markdown)."""
    from damselfly.config import reference_markdown

    click.echo(reference_markdown())


# -- certificates -------------------------------------------------------------------


@cli.group()
def certs() -> None:
    """A cluster CA and node certificates for mutual TLS (security.tls)."""


@certs.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Where the CA goes.")
@click.option("--name", default="damselfly cluster CA", show_default=True, help="The CA's common name.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True, help="Validity in days.")
def certs_init(directory: str, name: str, days: int) -> None:
    """Make a cluster CA: DIR/ca.pem (give it to every node) and DIR/ca-key.pem (0600; keep it off the nodes)."""
    from damselfly.security import certs as ca

    try:
        issued = ca.init_ca(Path(directory), name=name, days=days)
    except (DamselflyError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"CA certificate {issued.cert}\nCA key {issued.key} (mode 0600)")


@certs.command("issue")
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False), help="The CA's directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where NAME.pem goes.")
@click.option("--name", required=True, help="The node's name: the common name and the files' names.")
@click.option("--ip", "ips", multiple=True, help="An address the node is reached at (repeatable).")
@click.option("--dns", "dns", multiple=True, help="A DNS name the node is reached at, or its host name (repeatable).")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["peer", "seed", "scheduler", "client"]),
    help="What the node may do (repeatable; default: peer).",
)
@click.option("--days", type=click.IntRange(1, 36500), default=365, show_default=True, help="Validity in days.")
def certs_issue(
    ca_dir: str, out_dir: str, name: str, ips: tuple[str, ...], dns: tuple[str, ...], roles: tuple[str, ...], days: int
) -> None:
    """Issue OUT/NAME.pem and OUT/NAME-key.pem (0600) for a node reached at --ip/--dns.

    Set security.tls.ca to the CA's ca.pem and security.tls.cert and .key to these files.
    """
    from damselfly.security import certs as ca

    if not name or "/" in name or name.startswith("."):
        _fail(f"bad --name {name!r}: a plain file name is needed", 2)
    try:
        issued = ca.issue(Path(ca_dir), Path(out_dir), name, ips=ips, dns=dns, roles=roles or ("peer",), days=days)
    except (DamselflyError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"certificate {issued.cert}\nkey {issued.key} (mode 0600)")


# -- cluster and demo ---------------------------------------------------------------


@cli.group()
def cluster() -> None:
    """A local cluster of processes: scheduler, seed and peers."""


@cluster.command("up")
@click.option("--peers", type=click.IntRange(1, 256), default=3, help="Peer daemons besides the seed.")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Cluster directory.")
@click.option("--no-seed", is_flag=True, help="No seed peer: the first peer goes to the source.")
@click.option(
    "--schedulers", type=click.IntRange(1, 16), default=1, help="Schedulers; each task goes to one by hashing its id."
)
@click.option("--tls", is_flag=True, help="Mutual TLS everywhere, with a fresh CA in DIR/tls.")
def cluster_up(peers: int, directory: str, no_seed: bool, schedulers: int, tls: bool) -> None:
    """Start the cluster and write DIR/cluster.json.

    Every part runs on 127.0.0.1, so the config each process gets (DIR/config/NAME.yaml)
    allows loopback origins (security.sources.allow_loopback: true)."""
    from damselfly.sandbox import cluster as cl

    try:
        info = cl.up(Path(directory), peers, seed=not no_seed, schedulers=schedulers, tls=tls)
    except (DamselflyError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"cluster: {cl.CONFIG_NOTE.replace('DIR', directory)}", err=True)
    if tls:
        click.echo(
            f"cluster: mutual TLS with a fresh CA in {Path(directory) / 'tls'}; tools use client.pem there "
            f"(or --config {info['tls']['config']})",
            err=True,
        )
    click.echo(json.dumps(info, indent=2))


@cluster.command("down")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Cluster directory.")
def cluster_down(directory: str) -> None:
    """Stop every process of the cluster in DIR."""
    from damselfly.sandbox import cluster as cl

    try:
        n = cl.down(Path(directory))
    except DamselflyError as exc:
        _fail(str(exc))
    click.echo(f"stopped {n} processes")


@cli.command()
@click.option("--peers", type=click.IntRange(1, 64), default=8, help="Peers downloading at once.")
@click.option("--size", default="128MiB", help="Size of the generated file.")
@click.option(
    "--origin-rate",
    default="50MB/s",
    show_default=True,
    help="Token-bucket limit on the origin (as slow as a real registry or bucket); `unlimited` for none.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False), help="Keep files here.")
@click.option("--transport", default="tcp", show_default=True, help="Piece transport every peer uses (tcp, quic, ...).")
@click.option("--tls", is_flag=True, help="Mutual TLS everywhere (gRPC and piece transport), with a fresh CA.")
def demo(
    peers: int, size: str, origin_rate: str, as_json: bool, directory: str | None, transport: str, tls: bool
) -> None:
    """Run a local swarm: N peers download one file while the origin sends it once.

    Every part runs on 127.0.0.1, so the cluster's config allows loopback origins
    (security.sources.allow_loopback: true)."""
    from damselfly.sandbox import demo as dm

    try:
        result = dm.run(
            peers=peers,
            size=parse_size(size),
            origin_rate="" if origin_rate.strip().lower() in ("unlimited", "none", "0", "") else origin_rate,
            directory=directory,
            quiet=as_json,
            transport=transport,
            tls=tls,
        )
    except (DamselflyError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(dm.table(result))
    if not result["all_digests_ok"]:
        sys.exit(1)


def main() -> None:
    cli(prog_name="damselfly")


if __name__ == "__main__":
    main()
