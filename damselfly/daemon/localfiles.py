"""A local client's files, touched only as that client could: the outputs it names and the local
sources it reads.

An output is checked, created and renamed into place as the caller (``localrelay.as_caller``),
with its final mode before any byte is written; a local source is probed, then opened, as
the caller. Root and the daemon's own user may read whatever the daemon reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from damselfly.core.errors import InvalidArgument, PermissionDenied, StorageError
from damselfly.core.piece import ByteRange
from damselfly.daemon.localrelay import Caller, as_caller
from damselfly.security.admission import reads_this_node

if TYPE_CHECKING:
    from damselfly.contracts import Storage


def _unknown_caller(output_path: str) -> PermissionDenied:
    return PermissionDenied(f"cannot write {output_path}: the local caller's identity is unknown")


async def check_output(output_path: str, overwrite: bool, caller: Caller | None) -> None:
    """Checked before the download, as the caller: an output the caller could not write
    itself (a directory it may not reach or write to) is refused, and nothing is written."""
    path = Path(output_path)
    if not path.is_absolute():
        raise InvalidArgument(f"output path must be absolute, got {output_path!r}")
    if caller is None:
        raise _unknown_caller(output_path)

    def probe() -> None:
        dfd = _open_dir(path.parent, caller)
        try:
            if not overwrite and _exists(path.name, dfd):
                raise InvalidArgument(f"output {output_path!r} exists (pass overwrite to replace it)")
            name = f".{path.name}.{secrets.token_hex(6)}.damselfly-probe"
            try:
                os.close(os.open(name, _CREATE, 0o600, dir_fd=dfd))
            except PermissionError:
                raise PermissionDenied(f"{caller} may not write to {str(path.parent)!r}") from None
            except OSError as exc:
                raise StorageError(f"cannot write to {str(path.parent)!r}: {exc.strerror}") from None
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)

    await as_caller(caller, probe)


_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(directory: Path, caller: Caller) -> int:
    """A handle on ``directory`` opened as ``caller`` (run in ``as_caller``): it must reach it."""
    try:
        return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidArgument(f"output directory {str(directory)!r} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"{caller} may not write to {str(directory)!r}") from None
    except OSError as exc:
        raise StorageError(f"cannot open {str(directory)!r}: {exc.strerror}") from None


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


async def check_local_read(url_or_path: str, caller: Caller | None) -> None:
    """A local client reads this node's files only as it could itself: root and the daemon's
    own user may name any local source; anyone else only ``file://`` paths (or a cache import
    path) it may open for reading, checked as that user before anything is read."""
    if "://" in url_or_path:
        scheme = urlsplit(url_or_path).scheme.lower()
        if not reads_this_node(scheme):
            return
    else:
        scheme = "file"
    if caller is not None and caller.uid in (0, os.geteuid()):
        return
    if caller is None:
        raise PermissionDenied(f"cannot read {url_or_path}: the local caller's identity is unknown")
    if scheme != "file":
        raise PermissionDenied(f"{scheme}:// reads this node's files as the daemon: {caller} may use file:// only")
    path = unquote(urlsplit(url_or_path).path) if "://" in url_or_path else url_or_path

    def probe() -> None:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError:
            raise PermissionDenied(f"{caller} may not read {path!r}") from None
        except OSError:
            pass  # missing and the like: the source says so in its own words

    await as_caller(caller, probe)


def local_opener(caller: Caller | None) -> Callable[[str], Awaitable[int]] | None:
    """How a download for ``caller`` opens local files: as the caller, so that the kernel checks
    each open (a path swapped for a symlink after ``check_local_read`` gains nothing); None for
    root and the daemon's own user, who may read what the daemon reads."""
    if caller is None or caller.uid in (0, os.geteuid()):
        return None

    async def open_as_caller(path: str) -> int:
        def opening() -> int:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except PermissionError:
                raise PermissionDenied(f"{caller} may not read {path!r}") from None

        return await as_caller(caller, opening, undo=os.close)

    return open_as_caller


def output_mode(group: str) -> tuple[int, int]:
    """Mode and group (-1: the caller's) of the outputs the daemon writes, given the socket's
    group (``security.socket_group``). An output belongs to the user who asked for it (see
    ``localrelay``): 0600, or 0640 and the socket's group when one is set, so that the group
    allowed on the socket may read it."""
    if not group:
        return 0o600, -1
    return 0o640, socket_gid(group)


def socket_gid(group: str) -> int:
    """The id of ``group`` (a name or a number); InvalidArgument naming the setting when unknown."""
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"security.socket_group: no group named {group!r}") from None


async def export_output(
    storage: Storage,
    task_id: str,
    output_path: str,
    byte_range: ByteRange | None = None,
    caller: Caller | None = None,
    *,
    socket_group: str = "",
) -> None:
    """Copy the finished task (or its range) to a temp file beside the output, then rename it.

    The temp file is created and renamed by the caller (``as_caller``): it is the caller's,
    in a directory the caller may write, exactly as if the caller had written it, and it
    has its final mode (0600, or 0640 with the socket's group) before any byte is written.
    The daemon writes the bytes through the open file, never by a path the caller controls."""
    path = Path(output_path)
    if caller is None:
        raise _unknown_caller(output_path)
    mode, gid = output_mode(socket_group)
    tmp = f".{path.name}.{secrets.token_hex(6)}.damselfly-tmp"

    def create() -> tuple[int, int]:
        dfd = _open_dir(path.parent, caller)
        try:
            return dfd, os.open(tmp, _CREATE, 0o600, dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise

    def discard(created: tuple[int, int]) -> None:  # made for a download that was cancelled meanwhile
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=created[0])
        os.close(created[1])
        os.close(created[0])

    try:
        dfd, fd = await as_caller(caller, create, discard)
    except PermissionError:
        raise PermissionDenied(f"{caller} may not write {output_path!r}") from None
    except OSError as exc:
        raise StorageError(f"cannot write {output_path}: {exc.strerror}") from None

    def rename() -> None:
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)

    try:
        try:
            if gid >= 0:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        except OSError as exc:
            raise StorageError(f"cannot set the mode of {output_path}: {exc.strerror}") from None
        if byte_range is None:
            await storage.export(task_id, Path(f"/proc/self/fd/{fd}"))  # the open file itself
        else:
            with open(fd, "wb", closefd=False) as f:
                async for chunk in storage.read_range(task_id, *byte_range):
                    await asyncio.to_thread(f.write, chunk)
        os.fchmod(fd, mode)
        try:
            await as_caller(caller, rename)
        except PermissionError:
            raise PermissionDenied(f"{caller} may not replace {output_path!r}") from None
        except OSError as exc:
            raise StorageError(f"cannot write {output_path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(fd)
        os.close(dfd)
