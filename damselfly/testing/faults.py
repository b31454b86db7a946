"""Faults to inject between and into the parts of a running swarm, for tests and the soak.

:class:`FaultProxy` is a userspace TCP proxy (this machine has no netem) placed between any two
parts: peer and peer (the piece port), peer and scheduler (gRPC), seed and origin (HTTP). Each
direction has its own :class:`Faults`, switchable while bytes flow: a delay per chunk, a
throughput cap, a stall that holds bytes until released, a cut after N bytes, and flipped bytes
at given offsets. Offsets count per connection and direction, from its first byte. Memory is
bounded: each direction holds at most one chunk, and reads the next only when the last is written.

Process faults (:func:`kill`, :func:`stop`, :func:`cont`, :func:`stopped`) act on a pid, such as a
cluster daemon's ``info["pid"]``. The disk fault (:func:`small_disk`, :func:`fill`) mounts a small
tmpfs for a data dir and fills it; it needs root, and :func:`disk_faults_unavailable` says why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 64 * 1024


@dataclass
class Faults:
    """What happens to the bytes of one direction; change any field at any time.

    ``delay``: seconds each chunk waits before it is sent. ``rate``: bytes per second at most
    (None: unlimited). ``cut_after``: the connection is closed (both ways) once this many bytes
    went this way. ``flips``: offsets whose byte is sent inverted. Stall with :meth:`stall`, let
    the held bytes go with :meth:`release`.
    """

    delay: float = 0.0
    rate: int | None = None
    cut_after: int | None = None
    cut_once: bool = False  # the first cut switches ``cut_after`` off: later connections pass whole
    flips: set[int] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._flowing.set()

    def stall(self) -> None:
        """Hold every byte of this direction (connections stay open) until :meth:`release`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def clear(self) -> None:
        """No faults: bytes pass as they come."""
        self.delay, self.rate, self.cut_after, self.cut_once = 0.0, None, None, False
        self.flips.clear()
        self.release()


def apply_flips(chunk: bytes, start: int, flips: set[int]) -> bytes:
    """``chunk`` (the bytes from offset ``start``) with the byte at each offset in ``flips`` inverted."""
    hits = [o - start for o in flips if start <= o < start + len(chunk)]
    if not hits:
        return chunk
    out = bytearray(chunk)
    for i in hits:
        out[i] ^= 0xFF
    return bytes(out)


@dataclass
class Counters:
    """What the proxy saw: connections accepted, bytes forwarded each way, connections cut."""

    connections: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    cuts: int = 0


class FaultProxy:
    """Listens on ``listen_host`` (127.0.0.1, port 0 unless given) and forwards each connection to ``target``.

    To sit in front of a daemon's piece and upload ports, start the daemon with ``host.ip``
    127.0.0.2 (what peers are told) and fixed ports on ``listen_ip`` 127.0.0.1, and listen on
    127.0.0.2 with the same port numbers (see :func:`free_port`).

    ``up`` holds the faults of the bytes the client sends to the target; ``down`` of the bytes
    the target sends back. A cut (or either side closing abruptly) aborts both sockets.
    Use as ``async with FaultProxy(host, port) as proxy: proxy.address``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        listen_host: str = "127.0.0.1",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sleep = sleep  # a test can pass one that records the waits instead of waiting
        self.target = (target_host, target_port)
        self.up = Faults()
        self.down = Faults()
        self.counters = Counters()
        self._listen = (listen_host, port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self._listen[0]}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, *self._listen)
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection (held bytes are discarded)."""
        if self._server is not None:
            self._server.close()
        self.disconnect()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def disconnect(self) -> None:
        """Close every open connection now (new ones are still accepted)."""
        for w in list(self._writers):
            w.transport.abort()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counters.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        pair = (writer, up_writer)
        self._writers.update(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, self.up, "up_bytes", pair),
                self._pipe(up_reader, writer, self.down, "down_bytes", pair),
            )
        except asyncio.CancelledError:
            pass
        finally:
            for w in pair:
                w.transport.abort()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: Faults,
        counter: str,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        sent = 0
        try:
            while chunk := await reader.read(CHUNK):
                while chunk:
                    await faults._flowing.wait()
                    part = chunk
                    if faults.cut_after is not None:
                        part = part[: max(0, faults.cut_after - sent)]
                    if faults.rate:
                        part = part[: max(1, faults.rate // 10)]  # ten sends a second at most
                    chunk = chunk[len(part) :]
                    if faults.delay:
                        await self._sleep(faults.delay)
                    if faults.rate:
                        await self._sleep(len(part) / faults.rate)
                    await faults._flowing.wait()  # a stall set while this chunk waited holds it
                    if part:
                        writer.write(apply_flips(part, sent, faults.flips))
                        await writer.drain()
                        sent += len(part)
                        setattr(self.counters, counter, getattr(self.counters, counter) + len(part))
                    if faults.cut_after is not None and sent >= faults.cut_after:
                        self.counters.cuts += 1
                        if faults.cut_once:
                            faults.cut_after = None
                        for w in pair:
                            w.transport.abort()
                        return
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            for w in pair:
                w.transport.abort()


def free_port(*hosts: str) -> int:
    """A TCP port that is free on every one of ``hosts`` (loopback addresses) right now."""
    while True:
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    with socket.socket() as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port


# process faults


def kill(pid: int) -> None:
    """SIGKILL: the process dies at once, with nothing flushed or closed."""
    os.kill(pid, signal.SIGKILL)


def stop(pid: int) -> None:
    """SIGSTOP: the process freezes; its sockets stay open and its peers see silence."""
    os.kill(pid, signal.SIGSTOP)


def cont(pid: int) -> None:
    """SIGCONT: a stopped process runs again."""
    os.kill(pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (``T`` when stopped, ``Z`` a zombie)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` frozen for the block, and running again after it (whatever the block raised)."""
    stop(pid)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            cont(pid)


# disk faults


def disk_faults_unavailable() -> str | None:
    """Why :func:`small_disk` cannot work here (not root, no mount), or None when it can."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if not Path("/proc/filesystems").exists() or "tmpfs" not in Path("/proc/filesystems").read_text():
        return "this kernel has no tmpfs"
    return None


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``path`` (created) for the block, then unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int = 0, name: str = ".filler") -> int:
    """Write a file under ``path`` until at most ``leave`` bytes are free there; the bytes written."""
    written = 0
    with open(path / name, "ab") as f:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            want = min(free - leave, 1 << 20)
            if want <= 0:
                break
            try:
                written += f.write(b"\0" * want)
                f.flush()
            except OSError:
                break
    return written
