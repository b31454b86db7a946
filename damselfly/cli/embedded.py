"""The daemon that ``damselfly get`` starts for itself when none is running.

Front-end orchestration, kept with the CLI: its lifetime is one command (a private
directory, removed afterwards; the user's settings less seed, proxy and fixed ports; the
CLI's log sink), where p2pfs's embedded daemon (``sdk.p2pfs``) lives as long as its process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from damselfly.config import Settings
from damselfly.core.errors import DamselflyError, PeerError


def nothing_listens(path: Path) -> bool:
    """Whether no daemon answers on the unix socket ``path``: it is absent, or a stale file."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:
        return False  # something is there (another user's daemon, a busy one): the client says what
    finally:
        probe.close()
    return False


def embedded_settings(settings: Settings, root: Path) -> Settings:
    """The user's settings for a daemon that serves one ``get``: its data dir and socket in
    ``root``, never a seed, no proxy, metrics on a free port. With schedulers it joins their
    swarm as configured (listen address, ports, TLS); without, nothing can find its servers,
    so they listen on loopback at free ports."""
    daemon = settings.daemon
    update: dict[str, Any] = {"data_dir": root, "socket": root / "dfdaemon.sock", "seed": False, "metrics_port": 0}
    if not daemon.schedulers:
        update.update(listen_ip="127.0.0.1", upload_port=0, piece_port=0)
    return settings.model_copy(
        update={
            "daemon": daemon.model_copy(update=update),
            "proxy": settings.proxy.model_copy(update={"enabled": False}),
        }
    )


@contextlib.asynccontextmanager
async def embedded_daemon(settings: Settings, missing: Path) -> AsyncIterator[Path]:
    """A daemon in this process for one ``get`` (as ``p2p::`` starts one); yields its socket.

    Its directory is new, private (0700) and removed with everything in it when the download
    ends: inside the configured data dir when that exists and is this user's to write (the
    disk meant for task data), else in the system's temp dir. Downloads go through its unix
    socket, so they are admitted as any local client's."""
    from damselfly.daemon.daemon import Daemon

    def failed(exc: BaseException) -> PeerError:
        return PeerError(f"no daemon at {missing}, and an embedded one could not start: {exc}")

    parent = settings.daemon.data_dir
    usable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    try:
        root = Path(tempfile.mkdtemp(prefix="embedded-get-", dir=parent if usable else None))
    except OSError as exc:
        raise failed(exc) from None
    try:
        try:
            daemon = Daemon(embedded_settings(settings, root))
        except (DamselflyError, OSError) as exc:
            raise failed(exc) from None
        try:
            await daemon.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # what it started so far; the directory goes below
                await daemon.stop()
            if isinstance(exc, DamselflyError | OSError):
                raise failed(exc) from None
            raise
        try:
            yield daemon.socket_path
        finally:
            await daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def embedded_logs(settings: Settings) -> None:
    """The CLI's log sink while an embedded daemon serves a get: as ``setup_logs(quiet=True)``, less
    the daemon's own line for a failed download, which this command's error already says."""
    from damselfly.telemetry import logs

    def keep(record: Any) -> bool:
        return not (record["name"] == "damselfly.daemon.download" and record["message"].startswith("download failed: "))

    logs.setup("WARNING", settings.log.json_format, keep=keep)
