"""``damselfly get``: dfget's download through the local daemon (or an embedded one), one
url or, with -r, every file under it.

The flags that set a source's request options (--storage-*, --hdfs-*, --hf-*) come from
the sources' own descriptions of their options (``plugins.source.options``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from damselfly.cli.common import fail, parse_headers, settings_of, setup_logs
from damselfly.cli.embedded import embedded_daemon, embedded_logs, nothing_listens
from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound
from damselfly.core.units import format_size, parse_size
from damselfly.plugins.source.options import flags, from_flags

F = TypeVar("F", bound=Callable[..., Any])


def source_flags(command: F) -> F:
    """dfget's --storage-*, --hdfs-* and --hf-* flags: one for each option that a source's
    description gives a flag, in that order; ``from_flags`` reads them back."""
    for flag in reversed(flags()):
        command = click.option(flag.option, flag.param, default="", help=flag.help)(command)
    return command


class Bar:
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


def relative(base: str, url: str) -> str:
    """Where an entry of a recursive download goes under the output directory (never outside it)."""
    base_path = urlsplit(base).path.rstrip("/")
    path = urlsplit(url).path
    rel = path[len(base_path) :] if path.startswith(base_path) else path.rsplit("/", 1)[-1].rpartition("@")[2]
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidArgument(f"entry {url!r} does not lie under {base!r}")
    return "/".join(parts)


def run_download(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
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
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except asyncio.CancelledError:
        fail("terminated", 143)


@click.command()
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
@source_flags
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
    /,
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
    socket_path: str | None,
    no_embedded: bool,
    **source_flags: str,
) -> None:
    """Download URL through the local daemon into OUTPUT (written to a temp file, then renamed).

    With no daemon at the configured socket, one started inside this command serves the
    download (with the config's schedulers, if any, it joins their swarm) and stops after
    it, leaving nothing behind; --no-embedded fails instead. A --socket named on the
    command line is never replaced: its daemon must be running."""
    from damselfly.plugin_manager import build_plugins
    from damselfly.sdk.client import Client

    settings = settings_of(ctx)
    setup_logs(settings, quiet=True)
    try:
        plen = parse_size(piece_length) if piece_length else 0
        build_plugins(settings).source_for(url)  # a bad url or scheme is said before any socket is looked for
    except DamselflyError as exc:
        fail(str(exc), 2)
    if includes and not recursive:
        fail("--include needs -r/--recursive", 2)
    if recursive and digest:
        fail("--digest names one file; it cannot go with -r/--recursive", 2)
    hdrs = parse_headers(headers)
    options = from_flags(source_flags)
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
    embedded = not (socket_path or no_embedded) and nothing_listens(target)
    if embedded:
        embedded_logs(settings)

    def daemon_socket() -> contextlib.AbstractAsyncContextManager[Path]:
        return embedded_daemon(settings, target) if embedded else contextlib.nullcontext(target)

    if recursive:
        get_recursive(daemon_socket, url, Path(output), includes, concurrency, common)
    else:
        bar = Bar(not no_progress)

        async def main() -> Any:
            try:
                async with daemon_socket() as path, Client(path) as c:
                    return await c.download(url, output, digest=digest, on_progress=bar, **common)
            finally:
                bar.close()

        result = run_download(main)
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


def get_recursive(
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
        fail(f"output {str(out_dir)!r} exists and is not a directory", 2)

    async def main() -> list[tuple[str, Any]]:
        async with daemon_socket() as path, Client(path) as c:
            entries = await c.list_entries(
                url, headers=common["headers"], source_options=common["source_options"], timeout=common["timeout"] or 60
            )
            files = []
            for e in entries:
                if e.is_dir:
                    continue
                rel = relative(url, e.url)
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

    results = run_download(main)
    total = sum(r.content_length for _, r in results)
    peers = sum(r.peer_bytes for _, r in results)
    source = sum(r.source_bytes for _, r in results)
    click.echo(
        f"{out_dir}: {len(results)} files, {format_size(total)} (peers {format_size(peers)}, "
        f"source {format_size(source)})",
        err=True,
    )
