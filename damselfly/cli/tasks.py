"""``damselfly tasks`` and ``damselfly gc``: the tasks the local daemon holds."""

from __future__ import annotations

import json

import click

from damselfly.cli.common import client_call
from damselfly.core.units import format_size


@click.group()
def tasks() -> None:
    """The tasks the local daemon holds."""


@tasks.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def tasks_ls(ctx: click.Context, as_json: bool, socket_path: str | None) -> None:
    """List the daemon's tasks: id, size, and whether it is complete."""
    rows = client_call(ctx, socket_path, "list_tasks")
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


@tasks.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per timeline event.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def tasks_show(ctx: click.Context, task_id: str, as_json: bool, socket_path: str | None) -> None:
    """The piece timeline of the task's running (else last) download here: each piece asked of a
    parent and how it ended, reschedules, stalls and reads from the source, for diagnosis."""
    events = client_call(ctx, socket_path, "task_timeline", task_id)
    if as_json:
        for e in events:
            click.echo(json.dumps(e))
        return
    if not events:
        click.echo(f"{task_id}: no events")
        return
    start = events[0]["at"]
    click.echo(f"{'+seconds':>9}  {'event':<14} {'piece':>6}  {'parent':<24} {'bytes':>10} {'took':>7}  detail")
    for e in events:
        piece = str(e["piece"]) if e["piece"] >= 0 else "-"
        size = format_size(e["length"]) if e["length"] else ""
        took = f"{e['seconds']:.3f}s" if e["seconds"] else ""
        click.echo(
            f"{e['at'] - start:>9.3f}  {e['kind']:<14} {piece:>6}  {e['parent_id'] or '-':<24} "
            f"{size:>10} {took:>7}  {e['detail']}"
        )


@tasks.command("rm")
@click.argument("task_id")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def tasks_rm(ctx: click.Context, task_id: str, socket_path: str | None) -> None:
    """Delete a task from the daemon (and tell the scheduler)."""
    client_call(ctx, socket_path, "delete_task", task_id)
    click.echo(f"deleted {task_id}")


@click.command("gc")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--socket", "socket_path", default=None, help="Daemon socket (else from config).")
@click.pass_context
def gc_command(ctx: click.Context, as_json: bool, socket_path: str | None) -> None:
    """Run the daemon's garbage collection now (task TTL, quota and watermarks)."""
    report = client_call(ctx, socket_path, "collect_garbage")
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
