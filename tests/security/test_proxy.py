"""The node's proxy, attacked as a client of it would: local files, private blobs, relaying, slow heads.

Every test drives the proxy listener of a real daemon on 127.0.0.1. Upstreams are a real
registry (docker-registry, with htpasswd users) and small aiohttp servers of the test's
own that record what reached them: "the attacker's registry" answers 200 to everything.
Loopback origins are allowed or refused explicitly in each daemon's settings.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loguru import logger

from damselfly.config import load_settings
from damselfly.core import ids
from damselfly.daemon.daemon import Daemon
from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.runtime import Failed, Finished
from damselfly.testing import registry as reg
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
ALICE = "Basic " + base64.b64encode(b"alice:s3cret").decode()
MALLORY = "Basic " + base64.b64encode(b"mallory:guess").decode()
needs_registry = pytest.mark.skipif(bool(reg.missing_tools()), reason=f"needs {reg.missing_tools()}")


# -- a daemon, upstreams, a client -------------------------------------------------------------


StartDaemon = Callable[..., Awaitable[Daemon]]
Respond = Callable[[web.BaseRequest], web.StreamResponse]


@pytest.fixture
async def start_daemon(tmp_path) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(loopback=..., proxy={...}, sources={...}, limits={...})``: a started daemon."""
    started: list[Daemon] = []

    async def start(
        *, loopback: bool, proxy: dict[str, Any] | None = None, sources: dict[str, Any] | None = None, **security: Any
    ) -> Daemon:
        settings = load_settings(
            daemon={"data_dir": str(tmp_path / f"daemon{len(started)}")},
            proxy=proxy or {},
            security={"sources": {"allow_loopback": loopback, **(sources or {})}, **security},
        )
        d = Daemon(settings)
        await d.start()
        started.append(d)
        return d

    yield start
    for d in started:  # downloads a broken-off response left running end first
        await wait_for(lambda d=d: not d.board.all_running(), what="the daemon's downloads to end")
        await d.stop()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every log line the daemon writes during the test."""
    lines: list[str] = []
    logger.enable("damselfly")  # the package keeps quiet unless asked (damselfly/__init__.py)
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    yield lines
    logger.remove(sink)
    logger.disable("damselfly")


@dataclass
class Upstream:
    """An HTTP server on 127.0.0.1 that records each request and answers with ``respond``."""

    respond: Callable[[web.BaseRequest], web.StreamResponse]
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers)
    port: int = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, dict(request.headers)))
        return self.respond(request)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def upstreams() -> AsyncIterator[
    Callable[[Callable[[web.BaseRequest], web.StreamResponse]], Awaitable[Upstream]]
]:
    servers: list[asyncio.AbstractServer] = []

    async def start(respond: Callable[[web.BaseRequest], web.StreamResponse]) -> Upstream:
        up = Upstream(respond)
        server = await asyncio.get_running_loop().create_server(web.Server(up.handle), "127.0.0.1", 0)
        up.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return up

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


def says_yes_to_everything(body: bytes) -> Callable[[web.BaseRequest], web.StreamResponse]:
    """The attacker's registry: 200 to every request, ``body`` (or the range asked) to every GET."""

    def respond(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            return web.Response(headers={"Content-Length": str(len(body)), "Accept-Ranges": "bytes"})
        if not request.headers.get("Range"):
            return web.Response(body=body)
        wanted = request.http_range
        start, stop = wanted.start or 0, min(wanted.stop or len(body), len(body))
        content_range = f"bytes {start}-{stop - 1}/{len(body)}"
        return web.Response(status=206, body=body[start:stop], headers={"Content-Range": content_range})

    return respond


@dataclass
class Answer:
    status: int  # 0: no response at all (the connection broke before its head)
    body: bytes | None  # None: the body broke off
    headers: dict[str, str]

    @property
    def clean(self) -> bool:
        return self.status != 0 and self.body is not None


async def fetch(url: str, headers: dict[str, str] | None = None, proxy: str | None = None) -> Answer:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(url, headers=headers or {}, proxy=proxy) as r:
                try:
                    body: bytes | None = await r.read()
                except aiohttp.ClientPayloadError:
                    body = None
                return Answer(r.status, body, dict(r.headers))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return Answer(0, None, {})


async def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection to the proxy; everything it answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def push_blob(registry: reg.Registry, repo: str, data: bytes, authorization: str) -> str:
    """Upload ``data`` as a blob of ``repo`` (the distribution API's monolithic upload); its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = f"http://{registry.address}"
    auth = {"Authorization": authorization}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v2/{repo}/blobs/uploads/", headers=auth) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        location = location if location.startswith("http") else base + location
        sep = "&" if "?" in location else "?"
        async with s.put(f"{location}{sep}digest={digest}", data=io.BytesIO(data), headers=auth) as r:
            assert r.status == 201, await r.text()
    return digest


@pytest.fixture
def private_registry(tmp_path) -> Iterator[reg.Registry]:
    yield from reg.registry_fixture(tmp_path / "private", users={"alice": "s3cret"})


# -- 1. the upstream is http or https, never a local file ----------------------------------------


async def test_a_file_upstream_is_refused_and_no_file_is_read(start_daemon, tmp_path, logs):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$very-secret-hash:19000:0:99999:7:::\n")
    d = await start_daemon(loopback=False)
    proxy = f"http://127.0.0.1:{d.proxy.port}"
    for registry in ("file://", "file:///", "FILE://localhost", "ftp://127.0.0.1", "gopher://x"):
        for p2p in ({"X-Dragonfly-Use-P2P": "true"}, {}):
            a = await fetch(proxy + str(secret), {"X-Dragonfly-Registry": registry, **p2p})
            assert 400 <= a.status < 500, (registry, a)
            assert a.headers["X-Dragonfly-Error-Type"] == "proxy"
            assert a.body is not None and b"very-secret" not in a.body
            assert len(a.body.decode().strip().splitlines()) == 1, a.body
            assert "http and https" in a.body.decode()
    # the absolute form of a file URL (the request-target itself), with and without the swarm:
    # aiohttp's parser refuses file://, the proxy any other scheme but http and https
    for target in (f"file://{secret}", f"file://localhost{secret}", f"ftp://127.0.0.1{secret}"):
        for p2p in (b"X-Dragonfly-Use-P2P: true\r\n", b""):
            head = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            reply = await raw(d.proxy.port, head + p2p + b"\r\n")
            assert reply[9:10] == b"4", reply[:200]
            assert b"very-secret" not in reply
    assert d.storage.tasks() == []  # no task was ever made
    assert not any("very-secret" in line for line in logs)


# -- 4. private blobs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "blob"),
    [
        (f"/v2/team/secret/blobs/sha256:{'d' * 64}", ("team/secret", f"sha256:{'d' * 64}")),
        (f"/v2/a.b/c__d/e--f/blobs/sha512:{'e' * 128}", ("a.b/c__d/e--f", f"sha512:{'e' * 128}")),
        (f"/x/blobs/sha256:{'d' * 64}", None),
        (f"/v2/team/secret/blobs/sha256:{'d' * 64}/more", None),
        (f"/prefix/v2/team/secret/blobs/sha256:{'d' * 64}", None),
        (f"/v2/Team/blobs/sha256:{'d' * 64}", None),  # not the OCI name grammar
        (f"/v2/team//secret/blobs/sha256:{'d' * 64}", None),
        (f"/v2/team/secret/blobs/sha256:{'d' * 63}", None),
        (f"/v2/team/secret/blobs/md5:{'d' * 32}", None),
        (f"/v2/team/secret/blobs/sha256:{'d' * 64}\n", None),
    ],
)
def test_the_one_blob_parser(path, blob):
    parsed = ids.parse_blob_path(path)
    assert (None if parsed is None else (parsed.repository, parsed.digest)) == blob
    if path.isprintable():  # (urlsplit drops a URL's newlines itself)
        assert ids.blob_digest("http://registry.example" + path) == (blob[1] if blob else None)


@needs_registry
async def test_the_unanchored_blob_path_is_not_served(start_daemon, private_registry):
    data = os.urandom(3 * MiB + 5)
    digest = await push_blob(private_registry, "team/secret", data, ALICE)
    d = await start_daemon(loopback=True)
    # The blob lies here under its digest-only task id (a local pull made it): a path the
    # parser does not read as this blob must not reach that task, nor skip the registry's check.
    local = DownloadRequest(
        url=f"http://{private_registry.address}/v2/team/secret/blobs/{digest}",
        request_header={"Authorization": ALICE},
        use_blob_digest=True,
    )
    rt = await d.start_download(local)
    outcome = [e async for e in rt.follow() if isinstance(e, Finished | Failed)]
    assert isinstance(outcome[-1], Finished) and rt.task_id == digest.split(":")[1]
    proxy = f"http://127.0.0.1:{d.proxy.port}"
    registry = {"X-Dragonfly-Registry": f"http://{private_registry.address}"}
    for path in (
        f"/x/blobs/{digest}",
        f"/v2/team/secret/blobs/{digest}/x",
        f"/v2/Team/secret/blobs/{digest}",
        f"/prefix/v2/team/secret/blobs/{digest}",
    ):
        for p2p in ({}, {"X-Dragonfly-Use-P2P": "true"}):
            a = await fetch(proxy + path, {**registry, **p2p})
            assert a.status >= 400 and a.body != data, (path, a.status)
            assert a.headers.get("X-Dragonfly-Task-ID") != rt.task_id
    # the anchored path is checked with the registry: no credentials, no blob, though it is here
    a = await fetch(proxy + f"/v2/team/secret/blobs/{digest}", registry)
    assert a.status == 401 and a.body != data and "WWW-Authenticate" in a.headers
    assert private_registry.blob_bytes().get(digest, 0) == len(data)  # the local pull's read only


@needs_registry
async def test_a_registry_that_says_yes_does_not_authorise_another_registrys_blob(
    start_daemon, private_registry, upstreams, logs
):
    data = os.urandom(5 * MiB + 3)
    digest = await push_blob(private_registry, "team/secret", data, ALICE)
    attacker = await upstreams(says_yes_to_everything(b"not the blob" * 100))
    d = await start_daemon(loopback=True)
    proxy = f"http://127.0.0.1:{d.proxy.port}"
    path = f"/v2/team/secret/blobs/{digest}"
    # alice pulls the private blob with her credentials: a task bound to the registry and repository
    alice = await fetch(
        proxy + path, {"X-Dragonfly-Registry": f"http://{private_registry.address}", "Authorization": ALICE}
    )
    assert alice.status == 200 and alice.body == data
    bound = ids.keyed_task_id(
        ids.bound_blob_content("http", private_registry.address, ids.BlobPath("team/secret", digest))
    )
    assert alice.headers["X-Dragonfly-Task-ID"] == bound != digest.split(":")[1]
    # mallory names his own registry, which answers yes to everything, with or without credentials
    for creds in ({"Authorization": MALLORY}, {}):
        a = await fetch(proxy + path, {"X-Dragonfly-Registry": f"http://{attacker.address}", **creds})
        assert a.body != data and not (a.clean and a.status == 200), a
        assert a.headers.get("X-Dragonfly-Task-ID") != bound
    asked = [(m, p) for m, p, _ in attacker.seen]
    assert ("HEAD", path) in asked  # the check asked the registry the request is bound to
    # the private registry sent the blob once, to alice's pull; mallory got nothing of it
    assert private_registry.blob_bytes().get(digest, 0) == len(data)
    assert not any(ALICE.split()[1] in line or MALLORY.split()[1] in line for line in logs)  # never logged


# -- 6. a blob that does not match its digest ----------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 9 * MiB + 1], ids=["one-piece", "three-pieces"])
async def test_a_blob_that_does_not_match_its_digest_breaks_the_response(start_daemon, upstreams, logs, size):
    served = os.urandom(size)
    claimed = "sha256:" + hashlib.sha256(served + b"!").hexdigest()
    registry = await upstreams(says_yes_to_everything(served))
    d = await start_daemon(loopback=True)
    a = await fetch(
        f"http://127.0.0.1:{d.proxy.port}/v2/lib/app/blobs/{claimed}",
        {"X-Dragonfly-Registry": f"http://{registry.address}"},
    )
    assert not a.clean, a  # no clean end: the client sees an error, not a complete wrong blob
    assert a.status in (0, 200)  # the head went out (or not) but the body broke off
    assert any("broken off" in line and claimed in line for line in logs)
    # the same bytes under their true digest are served whole
    good = "sha256:" + hashlib.sha256(served).hexdigest()
    a = await fetch(
        f"http://127.0.0.1:{d.proxy.port}/v2/lib/app/blobs/{good}",
        {"X-Dragonfly-Registry": f"http://{registry.address}"},
    )
    assert a.clean and a.status == 200 and a.body == served


async def test_a_stored_blob_changed_on_disk_breaks_the_response(start_daemon, upstreams, logs):
    served = os.urandom(5 * MiB)
    digest = "sha256:" + hashlib.sha256(served).hexdigest()
    registry = await upstreams(says_yes_to_everything(served))
    d = await start_daemon(loopback=True)
    url = f"http://127.0.0.1:{d.proxy.port}/v2/lib/app/blobs/{digest}"
    headers = {"X-Dragonfly-Registry": f"http://{registry.address}"}
    a = await fetch(url, headers)
    assert a.clean and a.body == served
    task_id = a.headers["X-Dragonfly-Task-ID"]
    region = d.storage.piece_region(task_id, 0)
    assert region is not None
    with open(region.path, "r+b") as f:  # the stored copy changes under the daemon
        f.seek(region.offset + 10)
        f.write(bytes(b ^ 0xFF for b in served[10:14]))
    a = await fetch(url, headers)
    assert a.headers.get("X-Dragonfly-Task-Download-Finished", "true") == "true"  # served from disk, or not at all
    assert not a.clean and a.body != served
    assert any("broken off" in line and f"not {digest}" in line for line in logs)


# -- 2. no open relay ------------------------------------------------------------------------------------


async def test_connect_only_to_allowed_hosts(start_daemon, upstreams):
    up = await upstreams(lambda r: web.Response(text="tunnelled"))
    request = f"CONNECT {up.address} HTTP/1.1\r\nHost: {up.address}\r\n\r\n".encode()
    inner = b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    # by default: refused, naming the setting, and nothing reaches the host
    default = await start_daemon(loopback=False)
    reply = await raw(default.proxy.port, request + inner)
    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
    assert b"proxy.connect_allow" in reply and b"X-Dragonfly-Error-Type: proxy" in reply
    # allowed to the one host:port named, loopback allowed too
    d = await start_daemon(loopback=True, proxy={"connect_allow": [up.address]})
    reply = await raw(d.proxy.port, request + inner)
    assert reply.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200")
    assert reply.endswith(b"tunnelled")
    assert up.seen == [("GET", "/t", up.seen[0][2])]
    # another port of the same host is not named
    reply = await raw(d.proxy.port, f"CONNECT 127.0.0.1:{up.port + 1} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403") and b"not in proxy.connect_allow" in reply
    # a glob naming any host still meets the source policy: loopback refused when it is not allowed
    wide = await start_daemon(loopback=False, proxy={"connect_allow": ["*"]})
    for target in (up.address, f"localhost:{up.port}", "169.254.169.254:80", "[::1]:80"):
        reply = await raw(wide.proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode() + inner)
        assert reply.startswith(b"HTTP/1.1 403"), (target, reply[:200])
        assert b"source policy" in reply
    assert len(up.seen) == 1


async def test_absolute_form_and_registry_headers_do_not_reach_the_metadata_address(start_daemon, upstreams):
    up = await upstreams(lambda r: web.Response(text="reached"))
    default = await start_daemon(loopback=False)
    proxy = f"http://127.0.0.1:{default.proxy.port}"
    a = await fetch("http://169.254.169.254/latest/meta-data/iam/security-credentials/", proxy=proxy)
    assert a.status == 403 and a.headers["X-Dragonfly-Error-Type"] == "proxy"
    assert a.body is not None and b"proxy.connect_allow" in a.body
    # even where the operator lets absolute-form reach any host, the policy refuses the address
    wide = await start_daemon(loopback=False, proxy={"connect_allow": ["*"]})
    proxy = f"http://127.0.0.1:{wide.proxy.port}"
    for use_p2p in ({}, {"X-Dragonfly-Use-P2P": "true"}):
        a = await fetch("http://169.254.169.254/latest/meta-data/", headers=use_p2p, proxy=proxy)
        assert a.status == 403 and a.body is not None and b"metadata" in a.body, a
        # and in registry-mirror mode, the upstream a header names
        a = await fetch(proxy + "/latest/meta-data/", {"X-Dragonfly-Registry": "http://169.254.169.254", **use_p2p})
        assert a.status == 403 and a.body is not None and b"metadata" in a.body, a
    # a name is checked where it resolves, when the proxy connects: localhost is loopback
    for how in ({"X-Dragonfly-Registry": f"http://localhost:{up.port}"}, {"X-Dragonfly-Use-P2P": "true"}):
        if "X-Dragonfly-Registry" in how:
            a = await fetch(proxy + "/v2/", how)
        else:
            a = await fetch(f"http://localhost:{up.port}/v2/", how, proxy=proxy)
        assert a.status == 403 and a.body is not None and b"loopback" in a.body, a
    assert up.seen == []  # nothing reached the loopback server
    # allowed explicitly, the same requests go through
    ok = await start_daemon(loopback=True, proxy={"connect_allow": [f"localhost:{up.port}"]})
    a = await fetch(f"http://localhost:{up.port}/v2/", proxy=f"http://127.0.0.1:{ok.proxy.port}")
    assert a.status == 200 and a.body == b"reached"


# -- 3. proxy authentication and the header timeout ------------------------------------------------------


async def test_proxy_authentication(start_daemon, upstreams):
    up = await upstreams(lambda r: web.Response(text="manifest"))
    d = await start_daemon(
        loopback=True, proxy={"username": "ops", "password": "pr0xy pass", "connect_allow": [up.address]}
    )
    proxy = f"http://127.0.0.1:{d.proxy.port}"
    good = "Basic " + base64.b64encode(b"ops:pr0xy pass").decode()
    registry = {"X-Dragonfly-Registry": f"http://{up.address}"}
    for creds in ({}, {"Proxy-Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()},
                  {"Proxy-Authorization": "Bearer x"}, {"Proxy-Authorization": "Basic !!"}):  # fmt: skip
        a = await fetch(proxy + "/v2/app/manifests/v1", {**registry, **creds})
        assert a.status == 407 and a.headers["Proxy-Authenticate"].startswith("Basic")
        a = await fetch(f"http://{up.address}/v2/", creds, proxy=proxy)
        assert a.status == 407
    assert up.seen == []
    a = await fetch(proxy + "/v2/app/manifests/v1", {**registry, "Proxy-Authorization": good})
    assert a.status == 200 and a.body == b"manifest"
    assert "Proxy-Authorization" not in up.seen[-1][2]  # never passed on
    # CONNECT too
    connect = f"CONNECT {up.address} HTTP/1.1\r\nHost: a\r\n"
    inner = b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = await raw(d.proxy.port, connect.encode() + b"\r\n" + inner)
    assert reply.startswith(b"HTTP/1.1 407") and b"Proxy-Authenticate: Basic" in reply
    reply = await raw(d.proxy.port, f"{connect}Proxy-Authorization: {good}\r\n\r\n".encode() + inner)
    assert reply.startswith(b"HTTP/1.1 200 Connection established") and reply.endswith(b"manifest")
    # health checks stay open for probes
    assert (await fetch(proxy + "/healthy")).status == 200


async def test_a_client_slow_to_send_its_headers_is_disconnected(start_daemon):
    timeout = 0.5
    d = await start_daemon(loopback=False, limits={"header_timeout": timeout})
    loop = asyncio.get_running_loop()
    for partial in (b"GET /healthy HTTP/1.1\r\nHost: a\r\n", b"CONNECT a:443 HTTP/1.1\r\n", b"GE"):
        began = loop.time()
        reply = await raw(d.proxy.port, partial)
        assert reply == b"", reply  # disconnected without an answer
        assert loop.time() - began >= timeout * 0.8
    # and on a kept-alive connection, the next request's head too
    reader, writer = await asyncio.open_connection("127.0.0.1", d.proxy.port)
    try:
        writer.write(b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"OK"
        writer.write(b"GET /healthy HTTP/1.1\r\nHos")
        await writer.drain()
        began = loop.time()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert loop.time() - began >= timeout * 0.5
    finally:
        writer.close()
    # a client that sends its head in time, in pieces, is served
    reader, writer = await asyncio.open_connection("127.0.0.1", d.proxy.port)
    try:
        for part in (b"GET /heal", b"thy HTTP/1.1\r\nHost: a\r\n", b"Connection: close\r\n\r\n"):
            writer.write(part)
            await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_the_proxy_serves_its_clients_over_mutual_tls_when_asked(start_daemon, tmp_path):
    import ssl

    from damselfly.config import TlsConfig
    from damselfly.security import certs, tls

    ca, other = tmp_path / "ca", tmp_path / "other-ca"
    certs.init_ca(ca)
    certs.init_ca(other)
    node = certs.issue(ca, ca, "node", ips=["127.0.0.1"], roles=["peer"])
    client = certs.issue(ca, ca, "client", ips=["127.0.0.1"], roles=["client"])
    stranger = certs.issue(other, other, "stranger", ips=["127.0.0.1"], roles=["client"])
    d = await start_daemon(
        loopback=True,
        proxy={"tls": True},
        tls={"ca": str(ca / "ca.pem"), "cert": str(node.cert), "key": str(node.key)},
    )
    assert d.proxy is not None
    port = d.proxy.port
    ping = b"GET /healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def over_tls(context: ssl.SSLContext) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        try:
            writer.write(ping)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    member = tls.client_ssl_context(TlsConfig(ca=ca / "ca.pem", cert=client.cert, key=client.key))
    assert (await over_tls(member)).startswith(b"HTTP/1.1 200")
    # plaintext gets no HTTP answer; a client without a certificate, or with another CA's, is refused
    assert not (await raw(port, ping)).startswith(b"HTTP/")
    anonymous = ssl.create_default_context(cafile=str(ca / "ca.pem"))
    outsider = tls.client_ssl_context(TlsConfig(ca=ca / "ca.pem", cert=stranger.cert, key=stranger.key))
    for context in (anonymous, outsider):
        try:
            answer = await over_tls(context)
        except (ssl.SSLError, ConnectionResetError):
            answer = b""
        assert not answer.startswith(b"HTTP/")
