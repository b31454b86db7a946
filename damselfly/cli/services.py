"""``damselfly daemon`` and ``damselfly scheduler``: the long-running services."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import click

from damselfly.cli.common import fail, settings_of, setup_logs, write_ready
from damselfly.core.errors import DamselflyError


def quiet_gc() -> None:
    """For a service process that holds a large, long-lived state (the scheduler's hosts,
    tasks and peers): what exists at start-up is never collected, and the young generation
    is collected after 50,000 allocations instead of 700, so that state is rescanned less
    often. (In one 10,000-peer load run, collection switched off gave 15% more decisions a
    second; later runs put the difference within this VM's noise.)"""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
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
        fail(str(exc))


@click.command()
@click.option("--seed", is_flag=True, default=None, help="Run as a seed peer.")
@click.option("--ready-file", default=None, help="Write the bound addresses here as JSON once ready.")
@click.pass_context
def daemon(ctx: click.Context, seed: bool | None, ready_file: str | None) -> None:
    """Run a peer daemon (unix socket for local clients, upload gRPC, Vortex piece server)."""
    settings = settings_of(ctx)
    if seed:
        settings = settings.model_copy(update={"daemon": settings.daemon.model_copy(update={"seed": True})})
    setup_logs(settings)
    from damselfly.daemon.daemon import Daemon

    async def main() -> None:
        d = Daemon(settings)
        await d.start()
        try:
            ip = settings.daemon.listen_ip
            write_ready(
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

    run_service(main)


@click.command()
@click.option("--ready-file", default=None, help="Write the bound address here as JSON once ready.")
@click.pass_context
def scheduler(ctx: click.Context, ready_file: str | None) -> None:
    """Run the scheduler (scheduler.v2.Scheduler over gRPC)."""
    settings = settings_of(ctx)
    setup_logs(settings)
    from damselfly.scheduler import start_scheduler

    async def main() -> None:
        server = await start_scheduler(settings)
        quiet_gc()
        try:
            write_ready(
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

    run_service(main)
