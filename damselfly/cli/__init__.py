"""The ``damselfly`` command line: the root group and its command groups, one module each.

Each module is a front end only: it parses flags, calls the package (the services, the
sdk's client, the sandbox, ``oci.runtimes``...) and prints. ``services`` runs the daemon
and the scheduler; ``get`` downloads (``embedded`` starts a daemon for it when none runs);
``tasks``, ``cache`` and ``preheat`` talk to a running daemon or scheduler; ``introspect``
shows plugins and config; ``certs``, ``runtime`` and ``lab`` set things up.
"""

from __future__ import annotations

import click

from damselfly import __version__
from damselfly.cli import cache, certs, get, introspect, lab, preheat, runtime, services, tasks


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(), default=None, help="YAML config file (else $DAMSELFLY_CONFIG).")
@click.version_option(__version__, prog_name="damselfly")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """damselfly: peer-to-peer distribution that speaks Dragonfly v2."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


cli.add_command(services.daemon)
cli.add_command(services.scheduler)
cli.add_command(get.get)
cli.add_command(tasks.tasks)
cli.add_command(tasks.gc_command)
cli.add_command(cache.cache)
cli.add_command(preheat.preheat)
cli.add_command(runtime.runtime_config)
cli.add_command(introspect.plugins)
cli.add_command(introspect.config)
cli.add_command(certs.certs)
cli.add_command(lab.cluster)
cli.add_command(lab.demo)


def main() -> None:
    cli(prog_name="damselfly")


if __name__ == "__main__":
    main()
