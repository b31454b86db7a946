"""``damselfly cluster`` and ``damselfly demo``: local swarms on this machine (``damselfly.sandbox``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from damselfly.cli.common import fail
from damselfly.core.errors import DamselflyError
from damselfly.core.units import parse_size


@click.group()
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
        fail(str(exc))
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
        fail(str(exc))
    click.echo(f"stopped {n} processes")


@click.command()
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
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(dm.table(result))
    if not result["all_digests_ok"]:
        sys.exit(1)
