"""``damselfly cache``: persistent cache tasks (Dragonfly's dfcache)."""

from __future__ import annotations

import json
import os

import click

from damselfly.cli.common import client_call, fail
from damselfly.core.errors import DamselflyError
from damselfly.core.units import format_size, parse_duration


@click.group()
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
        fail(str(exc), 2)
    result = client_call(
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
    r = client_call(ctx, socket_path, "cache_export", task_id, os.path.abspath(output), timeout=timeout or None)
    click.echo(f"{r.output}: {format_size(r.content_length)} (peers {format_size(r.peer_bytes)})", err=True)


@cache.command("stat")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def cache_stat(ctx: click.Context, task_id: str, as_json: bool, socket_path: str | None) -> None:
    """What the swarm knows of cache task TASK_ID."""
    t = client_call(ctx, socket_path, "cache_stat", task_id)
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
