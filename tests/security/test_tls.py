"""Mutual TLS on the listeners that cross hosts (issue 25, item 6), each driven over its real
socket: the scheduler's native (damselfly.rpc) and grpcio listeners, the daemon's upload gRPC and its Vortex
piece server refuse a client without a certificate of the cluster CA; a client refuses a
server whose certificate does not name the address dialled; a server refuses a client whose
certificate does not name the address it connects from; ``damselfly certs`` writes 0600 keys;
damselfly.rpc's server refuses streams past its cap; a TLS cluster downloads a file."""

import asyncio
import contextlib
import os
import ssl
import stat
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loguru import logger

from damselfly.cli import cli
from damselfly.config import TlsConfig, load_settings
from damselfly.daemon.daemon import Daemon
from damselfly.daemon.schedulers import SchedulerPool
from damselfly.rpc import Connection, RpcError, Server, framing
from damselfly.scheduler import start_scheduler
from damselfly.security import certs, tls
from damselfly.security.identity import identity_from_pem

pytestmark = pytest.mark.timeout(90)

LOOPBACK = "127.0.0.1"
SETTINGS_FRAME = framing.frame(framing.SETTINGS, 0, 0)


class Pki:
    """A cluster CA with node certificates, and a second CA an intruder uses."""

    def __init__(self, root: Path):
        self.root = root
        self.ca_dir, self.other_dir, self.out = root / "ca", root / "other-ca", root / "certs"
        certs.init_ca(self.ca_dir)
        certs.init_ca(self.other_dir, name="somebody else's CA")
        certs.issue(self.ca_dir, self.out, "server", ips=[LOOPBACK], dns=["localhost"], roles=["scheduler", "peer"])
        certs.issue(self.ca_dir, self.out, "client", ips=[LOOPBACK], roles=["client", "peer"])
        # a certificate of the cluster CA for a node at another address
        certs.issue(self.ca_dir, self.out, "faraway", ips=["10.1.2.3"], dns=["faraway"], roles=["scheduler", "peer"])
        certs.issue(self.other_dir, self.out, "intruder", ips=[LOOPBACK], roles=["client", "peer"])

    @property
    def ca(self) -> Path:
        return self.ca_dir / certs.CA_CERT

    def cfg(self, name: str) -> TlsConfig:
        return TlsConfig(ca=self.ca, cert=self.out / f"{name}.pem", key=self.out / f"{name}-key.pem")

    def security(self, name: str) -> dict:
        c = self.cfg(name)
        return {"tls": {"ca": str(c.ca), "cert": str(c.cert), "key": str(c.key)}}

    def client_context(self, name: str | None, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
        """Trusts the cluster CA (so the server's certificate passes); shows ``name``'s certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca))
        if name is not None:
            ctx.load_cert_chain(str(self.out / f"{name}.pem"), str(self.out / f"{name}-key.pem"))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection with ``ctx``; the handshake must pass on our side (the server shows a
    certificate of the CA for 127.0.0.1), or this raises."""
    return await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port, ssl=ctx, server_hostname=LOOPBACK), 10)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()  # no TLS shutdown: a refusing server may never answer one
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()


async def speak(port: int, ctx: ssl.SSLContext, payload: bytes = framing.PREFACE + SETTINGS_FRAME) -> bytes:
    """Send ``payload`` over TLS with ``ctx``; what the server answers first."""
    reader, writer = await _connect(port, ctx)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        await _close(writer)


async def assert_refused(port: int, ctx: ssl.SSLContext, payload: bytes = framing.PREFACE + SETTINGS_FRAME) -> str:
    """The server completes TLS with its own certificate of the cluster CA, then refuses the
    client (a TLS alert, or a closed connection), never answering ``payload``. How it refused."""
    reader, writer = await _connect(port, ctx)  # a plaintext server would fail right here
    try:
        writer.write(payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return str(exc)
    finally:
        await _close(writer)
    assert answer == b"", f"the server answered a client it must refuse: {answer[:40]!r}"
    return "closed"


def is_h2_settings(data: bytes) -> bool:
    return len(data) >= 9 and data[3] == framing.SETTINGS


async def health_check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)).status


# -- the scheduler's listeners ---------------------------------------------------------------


@pytest.fixture(params=["native", "grpcio"])
async def tls_scheduler(request, pki):
    settings = load_settings(
        scheduler={"grpc_server": request.param, "seed_trigger": False}, security=pki.security("server")
    )
    server = await start_scheduler(settings)
    yield server, int(server.address.rpartition(":")[2])
    await server.stop()


async def test_scheduler_refuses_a_client_without_a_certificate_or_of_another_ca(tls_scheduler, pki):
    server, port = tls_scheduler
    answer = await speak(port, pki.client_context("client"))  # the control: a cluster member is served
    assert is_h2_settings(answer)
    await assert_refused(port, pki.client_context(None))
    await assert_refused(port, pki.client_context("intruder"))
    # and through grpcio's client, as a peer would call it
    async with tls.grpc_channel(server.address, pki.cfg("client")) as ch:
        assert await health_check(ch) == health_pb2.HealthCheckResponse.SERVING
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    async with grpc.aio.secure_channel(server.address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(ch)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(server.address) as ch:  # plaintext gets nothing either
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(ch)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_scheduler_refuses_a_certificate_that_does_not_name_the_callers_address(tls_scheduler, pki):
    """A certificate of the cluster CA stolen from the node at 10.1.2.3 is no use from 127.0.0.1."""
    server, _ = tls_scheduler
    async with tls.grpc_channel(server.address, pki.cfg("faraway")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(scheduler_pb2.ListHostsRequest(), timeout=10)
    # damselfly.rpc's server checks at the handshake, grpcio's interceptor at each call
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "does not name 127.0.0.1" in err.value.details()
    async with tls.grpc_channel(server.address, pki.cfg("client")) as ch:
        await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(scheduler_pb2.ListHostsRequest(), timeout=10)


async def test_a_daemon_refuses_a_scheduler_whose_certificate_does_not_name_the_address_dialled(pki):
    settings = load_settings(scheduler={"seed_trigger": False}, security=pki.security("faraway"))
    server = await start_scheduler(settings)
    try:
        # the daemon's own scheduler pool, with a good client certificate: the server is not 127.0.0.1's
        pool = SchedulerPool([server.address], 1.0, pki.cfg("client"))
        try:
            assert await pool.pick("ab" * 32) is None
        finally:
            await pool.close()
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await speak(int(server.address.rpartition(":")[2]), tls.client_ssl_context(pki.cfg("client"), ("h2",)))
    finally:
        await server.stop()


# -- the daemon's listeners ----------------------------------------------------------------


@pytest.fixture
async def tls_daemon(tmp_path, pki):
    settings = load_settings(
        daemon={"data_dir": str(tmp_path / "d")}, proxy={"enabled": False}, security=pki.security("server")
    )
    daemon = Daemon(settings)
    await daemon.start()
    yield daemon
    await daemon.stop()


async def test_daemon_upload_grpc_refuses_without_a_cluster_certificate(tls_daemon, pki):
    port = tls_daemon.upload_port
    assert is_h2_settings(await speak(port, pki.client_context("client")))
    await assert_refused(port, pki.client_context(None))
    await assert_refused(port, pki.client_context("intruder"))
    address = f"{LOOPBACK}:{port}"
    async with tls.grpc_channel(address, pki.cfg("client")) as ch:
        assert await health_check(ch) == health_pb2.HealthCheckResponse.SERVING
    # a certificate of the cluster CA that names another address: the interceptor refuses the call
    async with tls.grpc_channel(address, pki.cfg("faraway")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(ch)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "does not name 127.0.0.1" in err.value.details()


async def test_daemon_upload_channel_checks_the_other_daemons_certificate(tmp_path, pki, tls_daemon):
    """The channel a daemon opens to another daemon's upload server: that server's certificate
    must name the address dialled (``tls_daemon``'s does, ``far``'s names 10.1.2.3)."""
    settings = load_settings(
        daemon={"data_dir": str(tmp_path / "far")}, proxy={"enabled": False}, security=pki.security("faraway")
    )
    far = Daemon(settings)
    await far.start()
    me = Daemon(load_settings(daemon={"data_dir": str(tmp_path / "me")}, security=pki.security("client")))
    try:
        near = me.upload_channel(f"{LOOPBACK}:{tls_daemon.upload_port}")
        assert await health_check(near) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_check(me.upload_channel(f"{LOOPBACK}:{far.upload_port}"))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        for ch in me._upload_channels.values():
            await ch.close()
        await far.stop()


async def test_vortex_tcp_listener_refuses_a_client_without_a_certificate(tls_daemon, pki):
    """Vortex over TCP speaks TLS under security.tls; no client certificate, no piece."""
    port = tls_daemon.piece_port
    # a Vortex piece request: tag, length, task id (64 hex) and piece number
    request = struct.pack(">BI", 0, 68) + b"ab" * 32 + struct.pack(">I", 0)
    await assert_refused(port, pki.client_context(None, alpn=()), request)
    await assert_refused(port, pki.client_context("intruder", alpn=()), request)


@pytest.mark.parametrize("with_tls", [False, True])
async def test_a_daemon_beyond_loopback_without_tls_says_it_is_unauthenticated(tmp_path, pki, with_tls):
    logged: list[str] = []
    logger.enable("damselfly")
    sink = logger.add(lambda m: logged.append(str(m)), level="WARNING")
    try:
        security = pki.security("server") if with_tls else {}
        daemon_cfg = {"data_dir": str(tmp_path / "d"), "listen_ip": "0.0.0.0"}
        settings = load_settings(daemon=daemon_cfg, proxy={"enabled": False}, security=security)
        daemon = Daemon(settings)
        await daemon.start()
        await daemon.stop()
    finally:
        logger.remove(sink)
        logger.disable("damselfly")
    warned = [line for line in logged if "WITHOUT TLS" in line and "0.0.0.0" in line]
    assert bool(warned) is not with_tls, logged


def test_peer_ip_reads_every_form_of_grpc_peer():
    """grpcio writes an IPv6 peer URI-escaped; a dual-stack listener sees IPv4 clients mapped."""
    assert tls.peer_ip("ipv4:10.0.0.7:5000") == "10.0.0.7"
    assert tls.peer_ip("ipv6:%5B::1%5D:54286") == "::1"
    assert tls.peer_ip("ipv6:[fd00::7]:1") == "fd00::7"
    assert tls.peer_ip("ipv6:%5B::ffff:10.0.0.7%5D:1") == "10.0.0.7"
    assert tls.peer_ip("unix:/run/damselfly.sock") == ""


# -- certificates --------------------------------------------------------------------------


def test_certs_cli_makes_a_ca_and_node_certificates_with_private_keys(tmp_path):
    runner = CliRunner()
    ca_dir, out = tmp_path / "ca", tmp_path / "node"
    r = runner.invoke(cli, ["certs", "init", "--dir", str(ca_dir)])
    assert r.exit_code == 0, r.output
    args = ["certs", "issue", "--dir", str(ca_dir), "--out", str(out), "--name", "seed1"]
    r = runner.invoke(cli, [*args, "--ip", "10.0.0.7", "--dns", "seed1.example", "--role", "peer", "--role", "seed"])
    assert r.exit_code == 0, r.output
    for key in (ca_dir / "ca-key.pem", out / "seed1-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = identity_from_pem((out / "seed1.pem").read_bytes())
    assert identity.ips == {"10.0.0.7"} and identity.dns == {"seed1.example"}
    assert identity.roles == {"peer", "seed"} and identity.is_seed
    # the certificate chains to the CA
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(out / "seed1.pem"), str(out / "seed1-key.pem"))
    ctx.load_verify_locations(cafile=str(ca_dir / "ca.pem"))

    # bad input: one line each, nothing written
    r = runner.invoke(cli, ["certs", "init", "--dir", str(ca_dir)])
    assert r.exit_code == 1 and r.output.strip() == f"damselfly: error: a CA already exists in {ca_dir}"
    r = runner.invoke(cli, [*args[:-1], "bad", "--ip", "10.0.0.300"])
    assert r.exit_code == 1 and "bad IP address '10.0.0.300'" in r.output and len(r.output.splitlines()) == 1
    r = runner.invoke(cli, [*args[:-1], "bad"])
    assert r.exit_code == 1 and "needs at least one address" in r.output
    r = runner.invoke(
        cli, ["certs", "issue", "--dir", str(tmp_path / "none"), "--out", str(out), "--name", "x", "--ip", "::1"]
    )
    assert r.exit_code == 1 and "no CA in" in r.output
    assert not (out / "bad.pem").exists()


# -- damselfly.rpc's cap on concurrent streams --------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, off = [], 0
    while len(data) - off >= 9:
        hi, lo, kind, flags, sid = struct.unpack_from(">BHBBI", data, off)
        n = hi << 16 | lo
        if len(data) - off - 9 < n:
            break
        out.append((kind, flags, sid & 0x7FFFFFFF, data[off + 9 : off + 9 + n]))
        off += 9 + n
    return out


async def test_the_rpc_server_refuses_streams_past_its_cap(tmp_path):
    """The scheduler's native listener with grpc_max_streams=2: SETTINGS advertise 2, a third
    open stream is reset with REFUSED_STREAM, and one more is served once a stream ends."""
    settings = load_settings(
        scheduler={"grpc_server": "native", "seed_trigger": False}, security={"limits": {"grpc_max_streams": 2}}
    )
    server = await start_scheduler(settings)
    port = int(server.address.rpartition(":")[2])
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        block = framing.encode_headers(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/scheduler.v2.Scheduler/AnnouncePeer"),
                (":authority", server.address),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        writer.write(framing.PREFACE + SETTINGS_FRAME)
        for sid in (1, 3, 5):  # AnnouncePeer streams stay open until the client ends them
            writer.write(framing.frame(framing.HEADERS, framing.END_HEADERS, sid, block))
        await writer.drain()
        got: list[tuple[int, int, int, bytes]] = []
        buf = b""
        while not any(k == framing.RST_STREAM for k, _, _, _ in got):
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the server closed the connection"
            buf += chunk
            got = _frames(buf)
        settings_frame = next(p for k, f, s, p in got if k == framing.SETTINGS and not f & framing.ACK)
        advertised = dict(struct.iter_unpack(">HI", settings_frame))
        assert advertised[framing.S_MAX_CONCURRENT_STREAMS] == 2
        resets = [(s, struct.unpack(">I", p)[0]) for k, _, s, p in got if k == framing.RST_STREAM]
        assert resets == [(5, framing.REFUSED_STREAM)]
    finally:
        writer.close()
        await writer.wait_closed()
    # through damselfly.rpc's client: the cap is per connection and counts open streams only
    conn = await Connection.open(LOOPBACK, port)
    try:
        first, _second = (
            conn.stream("/scheduler.v2.Scheduler/AnnouncePeer"),
            conn.stream("/scheduler.v2.Scheduler/AnnouncePeer"),
        )
        third = conn.stream("/scheduler.v2.Scheduler/AnnouncePeer")
        with pytest.raises(RpcError, match=f"code {framing.REFUSED_STREAM}"):
            await asyncio.wait_for(third.recv(), 10)
        first.cancel()
        request = scheduler_pb2.ListHostsRequest().SerializeToString()
        reply = await conn.unary("/scheduler.v2.Scheduler/ListHosts", request, timeout=10)
        assert scheduler_pb2.ListHostsResponse.FromString(reply).hosts is not None
    finally:
        conn.close()
        await server.stop()


async def test_the_rpc_client_speaks_mutual_tls_to_its_server(pki):
    """damselfly.rpc on both ends over TLS: the servicer sees the client's verified certificate."""
    seen: list[bytes | None] = []

    async def whoami(request: bytes, context) -> bytes:
        seen.append(context.peer_certificate())
        return b"ok"

    server = Server()
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(whoami)}
    server.add_registered_method_handlers("t.T", handlers)
    port = tls.add_port(server, f"{LOOPBACK}:0", pki.cfg("server"))
    await server.start()
    try:
        conn = await Connection.open(LOOPBACK, port, ssl_context=tls.client_ssl_context(pki.cfg("client")))
        try:
            assert await conn.unary("/t.T/Who", b"", timeout=10) == b"ok"
        finally:
            conn.close()
        (der,) = seen
        assert der is not None
        assert tls.cert_names_ip(der, LOOPBACK) and not tls.cert_names_ip(der, "10.1.2.3")
        with pytest.raises(ValueError, match="client certificates required"):
            server.add_secure_port(
                f"{LOOPBACK}:0", tls.server_ssl_context(pki.cfg("server"), require_client_cert=False)
            )
    finally:
        await server.stop(0.5)


# -- a cluster under TLS ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_tls_cluster_downloads_a_file(tmp_path):
    from damselfly.sandbox.demo import sha256_of
    from damselfly.testing import OriginProcess, start_cluster

    origin = OriginProcess(tmp_path / "origin")
    cluster = None
    try:
        src = origin.make("blob.bin", 6 << 20)
        cluster = start_cluster(tmp_path / "cluster", 2, tls=True)
        assert cluster.tls is not None
        config = (tmp_path / "cluster" / "config" / "peer1.yaml").read_text()
        assert "allow_loopback: true" in config and "peer1-key.pem" in config
        for name in ("peer1", "peer2"):
            result = cluster.client(name).download(origin.url("blob.bin"), tmp_path / f"{name}.bin")
            assert sha256_of(tmp_path / f"{name}.bin") == sha256_of(src)
        assert result.peer_bytes == src.stat().st_size  # the second peer had it all from the swarm
        assert origin.stats()["bytes"] == src.stat().st_size  # the origin was read once

        async def plaintext_and_member() -> int:
            async with grpc.aio.insecure_channel(cluster.info["scheduler"]) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(scheduler_pb2.ListHostsRequest(), timeout=5)
            async with cluster.channel() as ch:
                hosts = await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(scheduler_pb2.ListHostsRequest())
            return len(hosts.hosts)

        assert asyncio.run(plaintext_and_member()) == 3

        # another member may not delete a daemon's task; an operator's client certificate may
        from damselfly.sandbox.cluster import tls_files

        task_id = result.task_id
        upload = cluster.daemon("peer1")["upload"]

        async def delete_as(name: str) -> grpc.StatusCode:
            files = {k: Path(v) for k, v in tls_files(tmp_path / "cluster", name).items()}
            async with tls.grpc_channel(upload, TlsConfig(**files)) as ch:
                try:
                    await dfdaemon_pb2_grpc.DfdaemonUploadStub(ch).DeleteTask(
                        dfdaemon_pb2.DeleteTaskRequest(task_id=task_id), timeout=10
                    )
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        assert asyncio.run(delete_as("peer2")) == grpc.StatusCode.PERMISSION_DENIED
        assert cluster.client("peer1").stat_task(task_id).content_length == src.stat().st_size
        assert asyncio.run(delete_as("client")) == grpc.StatusCode.OK

        # an operator's tool (preheat) with the cluster's client config speaks mutual TLS; without it, nothing
        origin.make("warm.bin", 1 << 20)
        preheat = [sys.executable, "-m", "damselfly", "preheat", origin.url("warm.bin"), "--json", "--timeout", "30"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
        out = subprocess.run(
            [*preheat[:3], "--config", cluster.info["tls"]["config"], *preheat[3:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        out = subprocess.run(
            [*preheat, "--scheduler", cluster.info["scheduler"]], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1 and "mutual TLS" in out.stderr
    finally:
        if cluster is not None:
            cluster.down()
        origin.stop()
