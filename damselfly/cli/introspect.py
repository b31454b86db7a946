"""``damselfly plugins`` and ``damselfly config``: what this node is made of."""

from __future__ import annotations

import json

import click

from damselfly.cli.common import fail, settings_of
from damselfly.core.errors import DamselflyError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per plugin.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List every loaded plugin, its kind and where it came from."""
    from damselfly.plugin_manager import build_plugins

    settings = settings_of(ctx)
    try:
        infos = build_plugins(settings).info()
    except DamselflyError as exc:
        fail(str(exc))
    if as_json:
        for i in infos:
            click.echo(json.dumps({"name": i.name, "kind": i.kind, "origin": i.origin, "unavailable": i.unavailable}))
        return
    click.echo(f"{'NAME':<16}{'KIND':<12}{'ORIGIN':<40}STATUS")
    for i in infos:
        click.echo(
            f"{i.name:<16}{i.kind:<12}{i.origin:<40}{'unavailable: ' + i.unavailable if i.unavailable else 'ok'}"
        )


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective configuration (defaults, YAML, env and flags merged)."""
    settings = settings_of(ctx)
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
