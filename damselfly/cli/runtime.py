"""``damselfly runtime-config``: print a container runtime's mirror configuration."""

from __future__ import annotations

import click

from damselfly.oci.runtimes import RUNTIMES, runtime_snippet


@click.command("runtime-config")
@click.argument("runtime", type=click.Choice(RUNTIMES))
@click.option("--proxy", "proxy_address", required=True, help="The local daemon's proxy, host:port.")
@click.option("--registry", default="docker.io", help="The registry to mirror (host[:port]).")
def runtime_config(runtime: str, proxy_address: str, registry: str) -> None:
    """Print the snippet that points RUNTIME's pulls at the daemon's proxy (registry mirror)."""
    click.echo(runtime_snippet(runtime, proxy_address, registry), nl=False)
