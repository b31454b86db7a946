"""Who is calling on the local socket, and acting as them on files.

grpcio does not expose a unix socket's peer credentials, so the daemon's public socket is
served by a small relay: for each connection it reads the caller's credentials
(``SO_PEERCRED``, ``SO_PEERGROUPS``) and opens a connection to the grpcio server's private
socket (in a 0700 directory only the daemon can reach) from a client socket bound to a
name that carries a random token. grpcio's ``context.peer()`` names that socket, and
``LocalRelay.caller_of`` maps the token back to the caller. Bytes are copied both ways
with the transports' flow control (a side that cannot keep up pauses the other side's
reads), and the two connections are closed together.

``as_caller`` runs a function in a thread of its own whose filesystem identity
(``setfsuid``/``setfsgid`` and the supplementary groups, per thread on Linux) is the
caller's: the kernel then decides what the caller may open, create and rename, with no
window between a check and the use.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import functools
import os
import platform
import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from damselfly.core.errors import PermissionDenied, StorageError

T = TypeVar("T")

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+, the same number on x86 and arm
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "arm64": 159}.get(platform.machine())
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
_HIGH_WATER = 256 * 1024  # bytes a side may hold for a slow reader before the other side stops reading
_CLOSE_GRACE = 5.0  # seconds a side closed by its partner may take to flush before it is aborted
_LONGEST_NAME = f"c.{2**32}.{2**32}.{'0' * 32}"  # a caller's socket name at its longest


@dataclass(frozen=True)
class Caller:
    """A local client, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"uid {self.uid} (gid {self.gid}, pid {self.pid})"


def peer_caller(sock: socket.socket) -> Caller:
    """The credentials of the process at the other end of the unix socket ``sock``."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    groups: tuple[int, ...] = ()
    for size in (256, 65536 * 4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # a kernel without SO_PEERGROUPS: the primary group only
        groups = tuple(array.array("I", raw[: len(raw) // 4 * 4]))
        break
    return Caller(pid, uid, gid, groups)


# -- acting as the caller ------------------------------------------------------------------------


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _set_thread_identity(caller: Caller) -> None:
    """Give the calling thread (only it) the caller's filesystem identity. glibc's ``setgroups``
    changes every thread, so the system call is made directly; ``setfsuid``/``setfsgid`` are per
    thread already. Dropping the fsuid from 0 also drops the thread's filesystem capabilities."""
    if _SYS_SETGROUPS is None:
        raise PermissionDenied(f"acting as another user is not supported on {platform.machine()}")
    libc = _libc()
    groups = (ctypes.c_uint * max(1, len(caller.groups)))(*caller.groups)
    if libc.syscall(_SYS_SETGROUPS, len(caller.groups), groups) != 0:
        raise OSError(ctypes.get_errno(), "setgroups")
    libc.setfsgid(caller.gid)
    libc.setfsuid(caller.uid)
    # both calls return the previous id; an invalid id (-1) changes nothing and reports the current one
    if libc.setfsgid(-1) != caller.gid or libc.setfsuid(-1) != caller.uid:
        raise OSError(errno.EPERM, f"cannot act as {caller}")


def _run_as(caller: Caller, fn: Callable[[], T]) -> T:
    result: list[Any] = []

    def run() -> None:
        try:
            _set_thread_identity(caller)
            result.append((True, fn()))
        except BaseException as exc:  # handed back to the waiting coroutine
            result.append((False, exc))

    thread = threading.Thread(target=run, name=f"as-uid-{caller.uid}", daemon=True)
    thread.start()
    thread.join()  # the thread ends with its identity: no pooled thread ever keeps it
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


async def as_caller(caller: Caller, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
    """``fn()`` with the files it touches opened, created and renamed as ``caller``.

    A daemon running as root acts as anyone; a daemon running as another user acts only
    for callers of its own uid (and as itself); any other caller gets PermissionDenied.
    ``fn`` runs to its end even when the awaiting task is cancelled; then ``undo`` gets what
    it returned (files it opened, say, to be closed)."""
    euid = os.geteuid()
    if caller.uid == euid and euid != 0:
        work = asyncio.ensure_future(asyncio.to_thread(fn))
    elif euid != 0:
        raise PermissionDenied(
            f"the daemon runs as uid {euid}, not root: it cannot read or write files as uid {caller.uid} "
            f"(ask as uid {euid}, or run the daemon as root)"
        )
    else:
        work = asyncio.ensure_future(asyncio.to_thread(_run_as, caller, fn))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(lambda t: _undo(t, undo))
        raise


def _undo(done: asyncio.Future[T], undo: Callable[[T], object] | None) -> None:
    if not done.cancelled() and done.exception() is None and undo is not None:
        undo(done.result())


# -- the public socket ---------------------------------------------------------------------------


def listen_unix(path: Path, mode: int, gid: int = -1) -> socket.socket:
    """A listening unix socket at ``path`` whose mode (and group) are set before it appears:
    it is bound in a private 0700 directory beside ``path``, given its mode, then renamed into
    place. (Where that would be too long a path, the umask makes it owner-only at bind.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))
    tmp = private / "s"
    try:
        if len(str(tmp).encode()) <= _MAX_UNIX_PATH:
            sock.bind(str(tmp))
            _set_mode(tmp, mode, gid)
            sock.listen(1024)
            os.replace(tmp, path)
        else:
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            _set_mode(path, mode, gid)
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    finally:
        tmp.unlink(missing_ok=True)
        private.rmdir()
    return sock


def _set_mode(path: Path, mode: int, gid: int) -> None:
    try:
        if gid >= 0:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise StorageError(f"cannot set the mode of socket {path}: {exc.strerror}") from None


# -- the relay -----------------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One connection of a relayed pair: what it reads is written to its partner."""

    def __init__(self, pair: _Pair):
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.partner: _Side | None = None
        self.lost = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        if self is self.pair.down:
            transport.pause_reading()  # nothing is read until the server side is there to take it
            self.pair.relay._accepted(self.pair)

    def data_received(self, data: bytes) -> None:
        partner = self.partner
        assert partner is not None
        assert partner.transport is not None
        partner.transport.write(data)

    def eof_received(self) -> bool:
        # HTTP/2 has no use for a half-closed connection (a side that stops writing can no longer
        # acknowledge or open windows): the end of either direction closes both, once flushed
        self.pair.close()
        return True

    def pause_writing(self) -> None:  # this side's peer reads slowly: stop reading what it would be sent
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def close(self) -> None:
        """Close after writing what is held; abort if the peer does not take it within a grace."""
        if self.transport is not None and not self.lost and self._deadline is None:
            self.transport.close()
            self._deadline = asyncio.get_running_loop().call_later(_CLOSE_GRACE, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        self.pair.close()  # the partner goes too
        self.pair.check_done()


class _Pair:
    """A caller's connection and the relay's connection to the server, opened and closed together."""

    def __init__(self, relay: LocalRelay):
        self.relay = relay
        self.down = _Side(self)
        self.up: _Side | None = None
        self.token = secrets.token_hex(16)
        self.connecting = True
        self.closing = False
        self.done = False

    def close(self) -> None:
        """Close both sides (each after writing what it holds; aborted if that takes too long)."""
        if self.closing:
            return
        self.closing = True
        for side in (self.down, self.up):
            if side is not None:
                side.close()
        self.check_done()

    def check_done(self) -> None:
        if self.done or not self.closing or self.connecting:
            return
        if self.down.lost and (self.up is None or self.up.lost):
            self.done = True
            self.relay._forget(self)


class LocalRelay:
    """The daemon's public unix socket: each caller's connection is relayed to ``upstream``, the
    grpcio server's socket in ``state_dir`` (0700), from a socket named after the caller."""

    def __init__(self, public: Path, state_dir: Path, mode: int = 0o600, gid: int = -1):
        self.public = public
        self.mode = mode
        self.gid = gid
        self.dir = _private_dir(state_dir)
        # sockets are named by a path short enough for sun_path: the directory's own, else the
        # directory through a handle this process holds on it (/proc/self/fd/N, this process only)
        self._dir_fd = -1
        self._names = self.dir
        if len(str(self.dir / _LONGEST_NAME).encode()) > _MAX_UNIX_PATH:
            self._dir_fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._names = Path(f"/proc/self/fd/{self._dir_fd}")
        self.upstream_path = self._names / "rpc.sock"
        self._server: asyncio.base_events.Server | None = None
        self._pairs: dict[str, tuple[_Pair, Caller]] = {}
        self._changed = asyncio.Event()
        self._connecting: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @property
    def upstream(self) -> str:
        """The grpcio address the server binds: reachable by the daemon's user alone."""
        return f"unix://{self.upstream_path}"

    @property
    def active(self) -> int:
        """Relayed connections not yet closed on both sides."""
        return len(self._pairs)

    def callers(self) -> list[Caller]:
        """The callers connected now, one per connection."""
        return [caller for _, caller in self._pairs.values()]

    async def start(self) -> None:
        sock = listen_unix(self.public, self.mode, self.gid)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Pair(self).down, sock=sock)

    async def close(self) -> None:
        """Stop accepting; close the connections still open (call after the server's graceful stop)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        for pair, _ in list(self._pairs.values()):
            pair.close()
        await self.wait_for(lambda: self.active == 0, timeout=_CLOSE_GRACE + 1)
        if server is not None:
            await server.wait_closed()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds, testing it whenever a connection comes or goes; False on timeout."""

        async def until() -> None:
            while not predicate():
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            return False
        return True

    def caller_of(self, context: Any) -> Caller | None:
        """The caller of a call on the server this relay feeds (None when its connection is gone)."""
        peer = context.peer() or ""
        if not peer.startswith("unix:"):
            return None
        parts = peer.rsplit("/", 1)[-1].split(".")
        if len(parts) != 4 or parts[0] != "c":
            return None
        entry = self._pairs.get(parts[3])
        if entry is None:
            return None
        caller = entry[1]
        return caller if parts[1:3] == [str(caller.uid), str(caller.gid)] else None

    # -- connections ---------------------------------------------------------------------------

    def _accepted(self, pair: _Pair) -> None:
        assert pair.down.transport is not None
        try:
            caller = peer_caller(pair.down.transport.get_extra_info("socket"))
        except (OSError, AttributeError) as exc:  # AttributeError: no SO_PEERCRED (not Linux)
            logger.warning("local socket: cannot read a caller's credentials ({}); closing it", exc)
            pair.connecting = False
            pair.close()
            return
        self.accepted += 1
        self._pairs[pair.token] = (pair, caller)
        self._notify()
        task = asyncio.ensure_future(self._open_upstream(pair, caller))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open_upstream(self, pair: _Pair, caller: Caller) -> None:
        loop = asyncio.get_running_loop()
        name = self._names / f"c.{caller.uid}.{caller.gid}.{pair.token}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up = _Side(pair)
        up.partner = pair.down  # the server speaks first
        try:
            sock.setblocking(False)
            sock.bind(str(name))
            try:
                await loop.sock_connect(sock, str(self.upstream_path))
            finally:
                name.unlink(missing_ok=True)  # the server keeps the name it saw; the file is not needed
            await loop.create_unix_connection(lambda: up, sock=sock)
        except (OSError, asyncio.CancelledError) as exc:
            sock.close()
            if not isinstance(exc, asyncio.CancelledError):
                logger.warning("local socket: cannot reach the daemon's server for {}: {}", caller, exc)
            pair.connecting = False
            pair.close()
            pair.check_done()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        pair.connecting = False
        pair.up = up
        pair.down.partner = up
        if pair.closing:  # the caller left while we connected
            up.close()
            pair.check_done()
        elif pair.down.transport is not None:
            pair.down.transport.resume_reading()

    def _forget(self, pair: _Pair) -> None:
        self._pairs.pop(pair.token, None)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def _private_dir(state_dir: Path) -> Path:
    """``state_dir`` made afresh, 0700 (it must be the daemon's own, not a symlink)."""
    if state_dir.is_symlink() or (state_dir.exists() and state_dir.stat().st_uid != os.geteuid()):
        raise StorageError(f"{state_dir} is not the daemon's own directory")
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(mode=0o700, parents=True)
    os.chmod(state_dir, 0o700)
    return state_dir
