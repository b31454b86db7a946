"""The local socket knows who calls: outputs belong to the caller, are written only where the
caller could write them itself, and the relay in front of the server leaks no connection.

Another user is a child process that drops to ``nobody`` (65534) and connects to the daemon's
socket (the kernel records its credentials then); it hands each connected socket back to the
test, which speaks gRPC over it through a bridge socket. Those tests need root."""

import asyncio
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from damselfly.config import load_settings
from damselfly.core.errors import PermissionDenied
from damselfly.daemon.daemon import Daemon
from damselfly.rpc import Connection
from damselfly.sandbox.origin import Origin, make_file
from damselfly.sdk.client import Client

NOBODY = 65534
SIZE = 300_000
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    """A short directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dfl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def origin(base: Path) -> AsyncIterator[Origin]:
    root = base / "origin"
    root.mkdir()
    make_file(root / "f.bin", SIZE)
    o = Origin(root)
    await o.start()
    yield o
    await o.stop()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@asynccontextmanager
async def daemon(base: Path, **security: Any) -> AsyncIterator[Daemon]:
    d = Daemon(load_settings(daemon={"data_dir": str(base / "d")}, security=security))
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


def nobody_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)
    return path


class AsUser:
    """Connections to ``target`` made by a child running as ``uid``/``gid``, used by this process
    through the unix socket ``bridge``: each connection to the bridge gets one of the child's."""

    def __init__(self, target: Path, bridge: Path, uid: int = NOBODY, gid: int = NOBODY):
        self.target, self.bridge, self.uid, self.gid = target, bridge, uid, gid
        self.pid = 0
        self._ctl: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "AsUser":
        ours, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # the child: only system calls, then _exit
            code = 0
            try:
                ours.close()
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                while theirs.recv(1):
                    s = socket.socket(socket.AF_UNIX)
                    try:
                        s.connect(str(self.target))
                        socket.send_fds(theirs, [b"k"], [s.fileno()])
                    except OSError:
                        theirs.send(b"e")
                    s.close()
            except BaseException:
                code = 1
            os._exit(code)
        theirs.close()
        self._ctl = ours
        self._server = await asyncio.start_unix_server(self._serve, str(self.bridge))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._ctl is not None
        self._server.close()
        for t in self._pipes:
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()
        self._ctl.close()
        _, status = await asyncio.to_thread(os.waitpid, self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0

    def connect(self) -> socket.socket:
        """A socket the child connected to ``target`` (as its user)."""
        assert self._ctl is not None
        self._ctl.send(b"c")
        _, fds, _, _ = socket.recv_fds(self._ctl, 1, 1)
        if not fds:
            raise PermissionError(f"uid {self.uid} cannot connect to {self.target}")
        return socket.socket(fileno=fds[0])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            ur, uw = await asyncio.open_unix_connection(sock=self.connect())
            await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
        except (OSError, asyncio.CancelledError):
            writer.close()
        finally:
            self._pipes.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# -- the caller's identity and its outputs -------------------------------------------------------


@as_root
async def test_the_daemon_sees_who_calls_and_the_output_is_theirs(base, origin):
    out_dir = nobody_dir(base / "home")
    async with daemon(base, socket_mode=0o666) as d, AsUser(d.socket_path, base / "bridge") as nobody:
        relay = d.local_relay
        assert relay is not None
        async with grpc.aio.insecure_channel(f"unix://{nobody.bridge}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            callers = relay.callers()
            assert [(c.uid, c.gid, c.pid) for c in callers] == [(NOBODY, NOBODY, nobody.pid)]
        async with Client(nobody.bridge) as c:
            await c.download(origin.url("f.bin"), out_dir / "f.bin")
        st = (out_dir / "f.bin").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
        assert digest(out_dir / "f.bin") == digest(origin.root / "f.bin")
        async with Client(d.socket_path) as c:  # root's own call: root's file
            await c.download(origin.url("f.bin"), base / "mine.bin")
        st = (base / "mine.bin").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
        assert sorted(p.name for p in out_dir.iterdir()) == ["f.bin"]  # no temp file left


@as_root
async def test_with_the_socket_group_the_output_is_the_callers_and_the_groups(base, origin):
    out_dir = nobody_dir(base / "home")
    async with daemon(base, socket_mode=0o660, socket_group=str(NOBODY)) as d:
        st = d.socket_path.stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o660)
        async with AsUser(d.socket_path, base / "bridge") as nobody, Client(nobody.bridge) as c:
            await c.download(origin.url("f.bin"), out_dir / "f.bin", byte_range=(1000, 5000))
        st = (out_dir / "f.bin").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
        assert (out_dir / "f.bin").read_bytes() == (origin.root / "f.bin").read_bytes()[1000:6000]


@as_root
async def test_a_caller_cannot_write_where_it_could_not_itself(base, origin):
    roots = base / "roots"  # root's, 0755: nobody may not create files in it
    roots.mkdir()
    hidden = base / "hidden"  # root's, 0700, with a world-writable directory inside
    hidden.mkdir(mode=0o700)
    inner = hidden / "open"
    inner.mkdir()
    inner.chmod(0o777)
    home = nobody_dir(base / "home")
    (home / "link").symlink_to(roots)  # nobody's symlink to root's directory
    sticky = base / "tmp"  # like /tmp: anyone creates, only owners replace
    sticky.mkdir()
    sticky.chmod(0o1777)
    victim = sticky / "victim"
    victim.write_bytes(b"root's file\n")
    async with (
        daemon(base, socket_mode=0o666) as d,
        AsUser(d.socket_path, base / "bridge") as nobody,
        Client(nobody.bridge) as c,
    ):
        for target in (roots / "x", inner / "x", home / "link" / "x"):
            with pytest.raises(PermissionDenied, match=f"uid {NOBODY} .*may not write"):
                await c.download(origin.url("f.bin"), target)
        assert origin.stats.requests == 0  # refused before anything was fetched
        with pytest.raises(PermissionDenied, match="may not replace"):
            await c.download(origin.url("f.bin"), victim)  # checked when the file is renamed into place
        await c.download(origin.url("f.bin"), sticky / "own")  # a new name there is fine
    assert list(roots.iterdir()) == [] and list(inner.iterdir()) == []
    assert victim.read_bytes() == b"root's file\n" and victim.stat().st_uid == 0
    assert sorted(p.name for p in sticky.iterdir()) == ["own", "victim"]  # no temp file left
    assert (sticky / "own").stat().st_uid == NOBODY


@as_root
async def test_a_caller_reads_only_the_local_files_it_could_read_itself(base):
    secret = base / "secret"
    secret.write_bytes(b"root:$6$hash:19000::::::\n")
    secret.chmod(0o600)
    private = base / "private"
    private.mkdir(mode=0o700)
    (private / "a").write_bytes(b"a")
    home = nobody_dir(base / "home")
    mine = home / "mine.bin"
    make_file(mine, SIZE)
    os.chown(mine, NOBODY, NOBODY)
    async with (
        daemon(base, socket_mode=0o666) as d,
        AsUser(d.socket_path, base / "bridge") as nobody,
        Client(nobody.bridge) as c,
    ):
        with pytest.raises(PermissionDenied, match=f"uid {NOBODY} .*may not read"):
            await c.download(secret.as_uri(), home / "stolen")
        with pytest.raises(PermissionDenied, match="may not read"):
            await c.cache_import(secret, ttl=60)
        with pytest.raises(PermissionDenied, match="may not read"):
            await c.list_entries(private.as_uri())
        assert [t.url for t in d.storage.tasks()] == []  # nothing of root's was read
        await c.download(mine.as_uri(), home / "copy")  # its own file, as it could read it itself
        assert digest(home / "copy") == digest(mine)
        async with Client(d.socket_path) as root:  # root reads what root may
            await root.download(secret.as_uri(), base / "root-copy")
    assert not (home / "stolen").exists()
    assert (base / "root-copy").read_bytes() == secret.read_bytes()


async def test_a_call_that_bypasses_the_relay_writes_nothing(base, origin):
    """Only the daemon's user reaches the server's own socket; even then, with no caller known,
    no output is written."""
    async with daemon(base) as d:
        relay = d.local_relay
        assert relay is not None
        assert stat.S_IMODE(relay.dir.stat().st_mode) == 0o700
        async with grpc.aio.insecure_channel(relay.upstream) as channel:
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
            download = common_pb2.Download(url=origin.url("f.bin"), output_path=str(base / "out"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download)):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "identity is unknown" in (err.value.details() or "")
    assert not (base / "out").exists()


# -- the relay -----------------------------------------------------------------------------------


async def test_the_relay_closes_both_sides_when_the_client_leaves(base, origin):
    async with daemon(base) as d:
        relay = d.local_relay
        assert relay is not None
        async with Client(d.socket_path) as c:
            await c.download(origin.url("f.bin"), base / "out")
            assert relay.active == 1
        assert await relay.wait_for(lambda: relay.active == 0, timeout=10)
        # a client that goes away in the middle of a stream of piece contents, and one that never spoke
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(d.socket_path))
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_unix_connection(lambda: Connection("localhost"), str(d.socket_path))
        assert await relay.wait_for(lambda: relay.active == 2, timeout=10)
        stream = conn.stream("/dfdaemon.v2.DfdaemonDownload/DownloadTask")
        download = common_pb2.Download(url=origin.url("f.bin"), need_piece_content=True, piece_length=65536)
        stream.send(dfdaemon_pb2.DownloadTaskRequest(download=download).SerializeToString(), end=True)
        first = dfdaemon_pb2.DownloadTaskResponse.FromString(await stream.recv())
        assert first.task_id
        transport.abort()  # gone, as a killed process
        sock.close()
        assert await relay.wait_for(lambda: relay.active == 0, timeout=10)
        assert [p.name for p in relay.dir.iterdir()] == ["rpc.sock"]  # the callers' socket names are gone
        # the server side going away closes the client's side too
        reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
        assert await relay.wait_for(lambda: relay.active == 1, timeout=10)
    assert relay.active == 0
    await asyncio.wait_for(reader.read(), 10)  # whatever the server said last, then the end
    assert reader.at_eof()
    writer.close()


async def test_many_concurrent_local_calls(base, origin):
    names = [f"f{i}.bin" for i in range(8)]
    for i, name in enumerate(names):
        make_file(origin.root / name, SIZE, seed=i)

    async def on_one_connection(c: Client, i: int) -> None:  # grpc shares one connection among clients
        name = names[i % len(names)]
        if i % 2:
            await c.download(origin.url(name), base / f"out{i}")
            assert digest(base / f"out{i}") == digest(origin.root / name)
        else:
            assert await c.read(origin.url(name)) == (origin.root / name).read_bytes()

    async def on_its_own_connection(i: int) -> None:
        name = names[i % len(names)]
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"unix://{d.socket_path}", options=options) as channel:
            download = common_pb2.Download(url=origin.url(name), output_path=str(base / f"own{i}"))
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
            async for _ in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download)):
                pass
        assert digest(base / f"own{i}") == digest(origin.root / name)

    async with daemon(base) as d, Client(d.socket_path) as c:
        relay = d.local_relay
        assert relay is not None
        await asyncio.gather(
            *(on_one_connection(c, i) for i in range(20)), *(on_its_own_connection(i) for i in range(20))
        )
        assert relay.accepted >= 21
    assert relay.active == 0


async def test_a_stale_private_directory_is_replaced(base):
    stale = base / "d" / "local"
    stale.mkdir(parents=True)
    (stale / "c.0.0.leftover").write_bytes(b"")
    stale.chmod(0o777)
    async with daemon(base) as d:
        assert d.local_relay is not None and d.local_relay.dir == stale
        assert stat.S_IMODE(stale.stat().st_mode) == 0o700
        assert [p.name for p in stale.iterdir()] == ["rpc.sock"]


async def test_a_data_directory_too_long_for_a_socket_name_still_names_the_caller(base, origin):
    deep = base / ("x" * 100)
    deep.mkdir()
    d = Daemon(load_settings(daemon={"data_dir": str(deep / "d"), "socket": str(base / "s.sock")}))
    await d.start()
    try:
        relay = d.local_relay
        assert relay is not None
        assert relay.dir == deep / "d" / "local" and len(str(relay.upstream_path)) < 108
        async with Client(d.socket_path) as c:
            await c.download(origin.url("f.bin"), base / "out")  # an output needs a known caller
        assert digest(base / "out") == digest(origin.root / "f.bin")
    finally:
        await d.stop()
    assert relay.active == 0


@as_root
async def test_a_file_source_opens_as_the_local_caller_so_a_swapped_symlink_gains_nothing(base):
    """check_local_read probes a path as the caller; the source then opens it again, as the
    caller too: a path the caller swaps for a symlink to root's file in between is refused."""
    from damselfly.config import SourcePolicyConfig
    from damselfly.daemon.localfiles import local_opener
    from damselfly.daemon.localrelay import Caller
    from damselfly.plugins.source.file import FileSource
    from damselfly.security.admission import Origin as Admitted
    from damselfly.security.admission import admitted
    from damselfly.security.policy import SourcePolicy

    secret = base / "root-only"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    mine = base / "public"
    mine.write_bytes(b"anyone may read this")
    mine.chmod(0o644)
    swapped = base / "swapped"
    swapped.symlink_to(secret)
    nobody = Caller(pid=os.getpid(), uid=65534, gid=65534)
    policy = SourcePolicy.from_config(SourcePolicyConfig())
    source = FileSource()

    async def read(path: Path) -> bytes:
        async def go() -> bytes:
            info = await source.stat(path.as_uri(), {})
            return b"".join([c async for c in source.read(path.as_uri(), 0, info.content_length, {})])

        with admitted(Admitted.LOCAL, policy, local_opener(nobody)):
            return await asyncio.get_running_loop().create_task(go())

    assert await read(mine) == b"anyone may read this"
    for path in (secret, swapped):
        with pytest.raises(PermissionDenied, match="may not read"):
            await read(path)
    assert local_opener(Caller(pid=1, uid=0, gid=0)) is None  # root reads as the daemon does
