"""``damselfly preheat``: put an image or a file on the swarm's hosts ahead of use (``sdk.preheat``)."""

from __future__ import annotations

import asyncio
import json

import click

from damselfly.cli.common import fail, parse_headers, settings_of
from damselfly.core.errors import DamselflyError


@click.command()
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

    from damselfly.sdk.preheat import preheat as run_preheat

    settings = settings_of(ctx)
    address = scheduler_address or (settings.daemon.schedulers[0] if settings.daemon.schedulers else None)
    if not address:
        fail("no scheduler: pass --scheduler HOST:PORT or set daemon.schedulers", 2)
    hdrs = parse_headers(headers)
    job = run_preheat(
        address,
        settings.security.tls,
        url,
        scope=scope,
        platform=platform,
        username=username,
        password=password,
        headers=hdrs,
        tag=tag,
        application=application,
        ips=ips,
        timeout=timeout,
    )
    try:
        report = asyncio.run(job)
    except grpc.aio.AioRpcError as exc:
        hint = ""
        if exc.code() is grpc.StatusCode.UNAVAILABLE and not settings.security.tls.enabled:
            hint = " (if the scheduler requires mutual TLS, set security.tls to a client certificate)"
        fail(f"preheat failed: {exc.details()}{hint}")
    except DamselflyError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(report))
        return
    for layer in report.get("layers", []):
        click.echo(f"{'done' if layer['finished'] else 'MISSING'}  {layer['url']}")
    for host, n in report.get("hosts", {}).items():
        click.echo(f"{host}: {n} blobs cached")
    click.echo(f"preheated {url} ({scope})")
