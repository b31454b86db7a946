"""``damselfly certs``: a cluster CA and node certificates for mutual TLS."""

from __future__ import annotations

from pathlib import Path

import click

from damselfly.cli.common import fail
from damselfly.core.errors import DamselflyError


@click.group()
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
        fail(str(exc))
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
        fail(f"bad --name {name!r}: a plain file name is needed", 2)
    try:
        issued = ca.issue(Path(ca_dir), Path(out_dir), name, ips=ips, dns=dns, roles=roles or ("peer",), days=days)
    except (DamselflyError, OSError) as exc:
        fail(str(exc))
    click.echo(f"certificate {issued.cert}\nkey {issued.key} (mode 0600)")
