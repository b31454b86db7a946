"""The admission point and the source policy, driven through the listeners an attacker would use:
the upload gRPC port, a scheduler's seed trigger, the local socket; origins and recorders on
127.0.0.0/8 (the suite allows loopback origins: tests of the default policy refuse it explicitly)."""

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core import ids
from damselfly.core.errors import BackendError, PermissionDenied
from damselfly.daemon.daemon import Daemon
from damselfly.daemon.request import CACHE_EXPIRES_HEADER, DownloadRequest
from damselfly.plugins.source.fsspec_source import S3Source
from damselfly.plugins.source.hf import HfSource
from damselfly.sandbox.origin import Origin as CountingOrigin
from damselfly.sandbox.origin import make_file
from damselfly.scheduler import start_scheduler
from damselfly.sdk.client import Client
from damselfly.security.admission import Origin, check_task_key, source_options
from tests.helpers.daemons import daemon
from tests.helpers.waiting import wait_for
from tests.helpers.web import http_server, registry_blob

SECRET = b"root:$6$not-for-the-network$:19000:0:99999:7:::\n"
NO_LOOPBACK = {"sources": {"allow_loopback": False}}  # the default policy, whatever the suite's environment says


@asynccontextmanager
async def upload_stub(d: Daemon) -> AsyncIterator[dfdaemon_pb2_grpc.DfdaemonUploadStub]:
    """A client of the daemon's real upload port, as any host that reaches it."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{d.upload_port}") as channel:
        yield dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)


async def upload_download(stub: dfdaemon_pb2_grpc.DfdaemonUploadStub, download: common_pb2.Download) -> None:
    async for _ in stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=30):
        pass


class Recorder:
    """A listener that records every connection and request it gets (and answers 404)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Recorder":
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                head = [line]
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    head.append(h)
                fields = dict(x.decode().split(":", 1) for x in head[1:] if b":" in x)
                self.requests.append((line.decode().strip(), {k.strip().lower(): v.strip() for k, v in fields.items()}))
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, UnicodeDecodeError, ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[CountingOrigin]:
    root = tmp_path / "origin"
    root.mkdir()
    make_file(root / "f.bin", 100_000)
    o = CountingOrigin(root)
    await o.start()
    yield o
    await o.stop()


def _stored(d: Daemon) -> list[str]:
    return [t.url for t in d.storage.tasks()]


# -- local files, refused schemes: the upload API -------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("{file}", "reads this node's own files"),
        ("file://localhost{path}", "reads this node's own files"),
        ("memory://anything/x", "reads this node's own files"),
        ("sftp://example.com/x", r"security\.sources\.schemes"),
        ("gopher://example.com/x", r"security\.sources\.schemes"),
    ],
)
async def test_the_upload_api_refuses_local_files_and_schemes_outside_the_policy(tmp_path, secret, url, says):
    url = url.format(file=secret.as_uri(), path=secret)
    async with daemon(tmp_path) as d, upload_stub(d) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload_download(stub, common_pb2.Download(url=url))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert re.search(says, err.value.details()) and "\n" not in err.value.details()
        assert _stored(d) == [] and not d.board.all_running()  # nothing was read, nothing is served
    # the same file from the local socket is a local user's to read
    async with daemon(tmp_path, "local") as d, Client(d.socket_path) as c:
        if url.startswith("file:"):
            await c.download(url, tmp_path / "mine")
            assert (tmp_path / "mine").read_bytes() == SECRET


async def test_a_seed_triggered_by_the_scheduler_does_not_read_a_peers_file_url(tmp_path, secret):
    """A peer registers a Download of file:///... on AnnouncePeer: the scheduler refuses the
    register (a node's own files are never swarm tasks), so no seed is asked to read it; the
    seed would refuse it too (its upload API's own check: see the DownloadTask tests above)."""
    sched = await start_scheduler(load_settings(scheduler={"seed_wait": 30, "retry_interval": 0.05}))
    try:
        async with daemon(tmp_path, "seed", daemon={"seed": True, "schedulers": [sched.address]}) as seed:
            async with grpc.aio.insecure_channel(sched.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)

                async def announced() -> bool:
                    return seed.host_id in await _host_ids(stub)

                await wait_for(announced, timeout=20, what="the seed to announce itself")
                attacker = common_pb2.Host(
                    id="10.9.9.9-attacker", type=0, hostname="attacker", ip="10.9.9.9", port=4000, download_port=4000
                )
                await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=attacker))
                download = common_pb2.Download(url=secret.as_uri())
                task_id = DownloadRequest.from_proto(download).task_id()
                call = stub.AnnouncePeer()
                await call.write(
                    scheduler_pb2.AnnouncePeerRequest(
                        host_id=attacker.id,
                        task_id=task_id,
                        peer_id="10.9.9.9-attacker-peer",
                        register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download),
                    )
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call.read()
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                triggered = await _wait_for_metric(sched.metrics_port, "trigger_seed_peer_total", 0, timeout=0)
            assert triggered == 0  # no seed was asked
            assert seed.storage.get(task_id) is None and _stored(seed) == []
    finally:
        await sched.stop()


async def _host_ids(stub: scheduler_pb2_grpc.SchedulerStub) -> set[str]:
    return {h.id for h in (await stub.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}


async def _wait_for_metric(port: int, name: str, at_least: float, timeout: float = 20) -> float:
    """Poll the scheduler's real /metrics until ``name`` reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            m = re.search(rf"^\S*{name} (\S+)$", text, re.M)
            value = float(m.group(1)) if m else 0.0
            if value >= at_least or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.05)


# -- a task id from the network is its url's ----------------------------------------------------


async def test_the_upload_api_refuses_a_task_key_that_is_not_its_urls_and_takes_a_bound_blob_key(tmp_path, origin):
    """Task poisoning: the attacker names, as content_for_calculating_task_id, the string whose
    sha256 is the victim URL's task id, with its own URL (bytes it serves): refused, and the
    victim's task holds nothing. A blob's registry-bound key of its own URL (credentialed pulls,
    as the proxy and preheat make it) is taken."""
    victim = DownloadRequest(url="http://registry.example/files/app.tar")
    preimage = ids.filter_query_params(victim.url, ids.DEFAULT_FILTERED_QUERY_PARAMS) + ids.STANDARD_TASK_TYPE
    assert ids.content_task_id(preimage) == victim.task_id()  # upstream's key would name the victim's task
    blob = b"the blob's own bytes\n" * 1000
    blob_url, bound = registry_blob(origin, "library/app", blob)
    async with daemon(tmp_path) as d, upload_stub(d) as stub:
        for key in (preimage, bound):  # a blob's key for another url is no better
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload_download(
                    stub, common_pb2.Download(url=origin.url("f.bin"), content_for_calculating_task_id=key)
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            details = err.value.details()
            assert "content_for_calculating_task_id" in details and "\n" not in details
        assert d.storage.get(victim.task_id()) is None and _stored(d) == [] and not d.board.all_running()
        assert origin.stats.by_method == {}  # the attacker's bytes were never fetched
        await upload_download(stub, common_pb2.Download(url=blob_url, content_for_calculating_task_id=bound))
        task = d.storage.get(ids.keyed_task_id(bound))
        assert task is not None and task.url == blob_url and task.content_length == len(blob)
        assert _stored(d) == [blob_url]


async def test_a_local_client_keeps_its_own_task_key(tmp_path, origin):
    """dfget's --content-for-calculating-task-id: a user of this node names its task."""
    async with daemon(tmp_path) as d, Client(d.socket_path) as c:
        await c.download(origin.url("f.bin"), tmp_path / "out", content_for_calculating_task_id="my build 42")
        task = d.storage.get(ids.keyed_task_id("my build 42"))
        assert task is not None and task.url == origin.url("f.bin")


def test_which_task_keys_a_request_from_the_network_may_carry():
    cache = "damselfly-cache://" + "ab" * 32
    blob_url = "https://Registry.Example:5000/v2/team/app/blobs/sha256:" + "cd" * 32
    bound = ids.bound_blob_content("https", "registry.example:5000", ids.parse_blob_url(blob_url))
    for origin in (Origin.UPLOAD, Origin.SCHEDULER, Origin.PROXY, Origin.PREHEAT):
        check_task_key(cache, cache, origin)  # a cache replica names its task by its url
        check_task_key(blob_url, bound, origin)
        check_task_key("http://o.example/x", "", origin)
        for url, key in ((cache, cache + "?x"), (blob_url, bound.replace("team/app", "team/other")), (blob_url, cache)):
            with pytest.raises(PermissionDenied, match="content_for_calculating_task_id"):
                check_task_key(url, key, origin)
    for origin in (Origin.LOCAL, Origin.INTERNAL):
        check_task_key("http://o.example/x", "anything", origin)
    with pytest.raises(PermissionDenied, match="registry-bound blob key"):  # a local client shows no credentials
        check_task_key(blob_url, bound, Origin.LOCAL)
    with pytest.raises(PermissionDenied, match="registry-bound blob key"):
        check_task_key("http://o.example/x", bound, Origin.INTERNAL)
    check_task_key(blob_url, bound, Origin.INTERNAL)


# -- the source policy at connect time --------------------------------------------------------


async def test_a_redirect_to_a_refused_address_is_refused_before_it_connects(tmp_path):
    """The origin (127.0.0.1, allowed through allow_networks) redirects to 127.0.0.2, a loopback
    address the policy refuses: the daemon never connects there."""
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        hits.append(request.method)
        raise web.HTTPFound(f"{target.base}/secret-metadata")

    async with http_server(redirect, "/r") as base:
        policy = {"sources": {"allow_loopback": False, "allow_networks": ["127.0.0.1/32"]}}
        async with Recorder("127.0.0.2") as target, daemon(tmp_path, security=policy) as d:
            async with Client(d.socket_path) as c:
                with pytest.raises(PermissionDenied, match=r"127\.0\.0\.2.*security\.sources\.allow_loopback"):
                    await c.download(f"{base}/r", tmp_path / "out")
            assert hits  # the origin was reached and redirected
            assert target.connections == 0  # the redirect's target never was
            assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("s3://bucket/key", {"object_storage": {"endpoint": "{base}", "access_key_id": "a", "access_key_secret": "b"}}),
        ("hf://acme/llm/model.bin", {"hugging_face": {"base_url": "{base}"}}),
        ("hdfs://{host}/data/file", {}),
        ("oci://{host}/library/app@sha256:" + "0" * 64, {}),
    ],
)
async def test_every_source_checks_the_server_it_would_reach(tmp_path, url, options):
    """Each source plugin's server (an S3 endpoint, a hub, a namenode, a registry) on 127.0.0.2,
    which the default policy refuses: neither a local client nor the network gets it reached."""
    async with Recorder("127.0.0.2") as target, daemon(tmp_path, security=NO_LOOPBACK) as d:
        url = url.format(host=f"{target.host}:{target.port}")
        options = {k: {f: v.format(base=target.base) for f, v in o.items()} for k, o in options.items()}
        async with Client(d.socket_path) as c:
            with pytest.raises(PermissionDenied, match=r"security\.sources\.allow_loopback"):
                await c.download(url, tmp_path / "out", source_options=options)
        download = common_pb2.Download(url=url)
        for name, values in options.items():
            getattr(download, name).MergeFrom(type(getattr(download, name))(**values))
        async with upload_stub(d) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload_download(stub, download)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert target.connections == 0 and _stored(d) == []


async def test_a_local_get_of_a_loopback_url_fails_naming_the_setting(tmp_path, origin):
    async with daemon(tmp_path, security=NO_LOOPBACK) as d, Client(d.socket_path) as c:
        with pytest.raises(PermissionDenied) as err:
            await c.download(origin.url("f.bin"), tmp_path / "out")
    message = str(err.value)
    assert "security.sources.allow_loopback" in message and "127.0.0.1" in message and "\n" not in message
    assert origin.stats.by_method == {}  # refused before anything was sent


# -- credentials -------------------------------------------------------------------------------


def _authorizations(rec: Recorder) -> list[str]:
    return [h.get("authorization", "") for _, h in rec.requests]


async def test_an_endpoint_override_gets_no_configured_credentials(tmp_path):
    """The node's Hugging Face token goes to the hub it is configured for, never to a base_url
    a request names, and never with a request from the network."""
    async with Recorder() as hub, Recorder() as evil:
        sources = {"hf": {"token": "hf_node_secret", "base_url": hub.base}}
        async with daemon(tmp_path, sources=sources) as d:
            async with Client(d.socket_path) as c:
                with pytest.raises(BackendError):
                    await c.download("hf://acme/llm/model.bin", tmp_path / "a")
                assert _authorizations(hub) == ["Bearer hf_node_secret"]  # the configured hub gets it
                with pytest.raises(BackendError):
                    await c.download(
                        "hf://acme/llm/model.bin",
                        tmp_path / "b",
                        source_options={"hugging_face": {"base_url": evil.base}},
                    )
                assert evil.requests and _authorizations(evil) == [""] * len(evil.requests)
                with pytest.raises(BackendError):  # a request's own token goes with it, to where it says
                    await c.download(
                        "hf://acme/llm/other.bin",
                        tmp_path / "c",
                        source_options={"hugging_face": {"base_url": evil.base, "token": "hf_mine"}},
                    )
                sent = _authorizations(evil)
                assert "Bearer hf_mine" in sent and "Bearer hf_node_secret" not in sent
            hub.requests.clear()
            async with upload_stub(d) as stub:  # from the network: no borrowed token, even to the configured hub
                with pytest.raises(grpc.aio.AioRpcError):
                    await upload_download(stub, common_pb2.Download(url="hf://acme/llm/third.bin"))
            assert hub.requests and _authorizations(hub) == [""] * len(hub.requests)


def test_source_options_leave_the_nodes_credentials_with_the_node():
    configured = {"region": "eu", "endpoint": "https://s3.example.com", "access_key_id": "AK", "access_key_secret": "S"}
    own = {"object_storage": {"access_key_id": "MINE", "access_key_secret": "MS"}}
    assert source_options(S3Source, configured, None, Origin.LOCAL) == configured
    for origin in (Origin.UPLOAD, Origin.SCHEDULER, Origin.PROXY, Origin.PREHEAT, None):
        assert source_options(S3Source, configured, None, origin) == {
            "region": "eu",
            "endpoint": "https://s3.example.com",
        }
        assert source_options(S3Source, configured, own, origin)["access_key_id"] == "MINE"
    moved = {"object_storage": {"endpoint": "http://attacker.example"}}
    assert "access_key_id" not in source_options(S3Source, configured, moved, Origin.LOCAL)
    same = {"object_storage": {"endpoint": "https://s3.example.com"}}
    assert source_options(S3Source, configured, same, Origin.LOCAL)["access_key_id"] == "AK"
    default_hub = {"hugging_face": {"base_url": "https://huggingface.co"}}  # the default is no override
    kept = source_options(HfSource, {"token": "t"}, default_hub, Origin.LOCAL)
    assert kept == {"token": "t", "base_url": "https://huggingface.co"}


# -- pinning, StatTask ---------------------------------------------------------------------------


async def test_only_a_local_client_pins_a_task_against_gc(tmp_path, origin):
    far = repr(time.time() + 86400)
    async with daemon(tmp_path) as d:
        async with upload_stub(d) as stub:
            await upload_download(
                stub, common_pb2.Download(url=origin.url("f.bin"), request_header={CACHE_EXPIRES_HEADER: far})
            )
            (task,) = d.storage.tasks()
            assert task.expires_at == 0.0  # an anonymous host may not pin it
            stat = await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=task.id))
            assert dict(stat.request_header) == {}
        async with Client(d.socket_path) as c:
            await c.download(origin.url("f.bin"), tmp_path / "out", headers={CACHE_EXPIRES_HEADER: far}, tag="local")
        pinned = [t for t in d.storage.tasks() if t.tag == "local"]
        assert pinned and pinned[0].expires_at == float(far)


# -- the local socket and outputs ----------------------------------------------------------------


async def test_the_socket_and_outputs_are_the_owners_alone(tmp_path, origin):
    async with daemon(tmp_path) as d:
        assert d.socket_path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in d.socket_path.parent.iterdir() if p.name.startswith(".")] == []  # no private dir left
        async with Client(d.socket_path) as c:
            await c.download(origin.url("f.bin"), tmp_path / "out")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600
    gid = os.getgid()
    shared = {"socket_mode": 0o660, "socket_group": str(gid)}
    async with daemon(tmp_path, "shared", security=shared) as d:
        st = d.socket_path.stat()
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == gid
        async with Client(d.socket_path) as c:
            await c.download(origin.url("f.bin"), tmp_path / "shared-out")
        st = (tmp_path / "shared-out").stat()
        assert st.st_mode & 0o777 == 0o640 and st.st_gid == gid


async def test_an_output_path_sent_over_the_upload_api_is_dropped(tmp_path):
    """Another host may have this daemon fetch an allowed origin, never write a file of its choosing."""
    (tmp_path / "origin").mkdir()
    make_file(tmp_path / "origin" / "f.bin", 100_000)
    origin = CountingOrigin(tmp_path / "origin")
    await origin.start()
    target = tmp_path / "written-by-the-network"
    try:
        async with daemon(tmp_path) as d, upload_stub(d) as stub:
            download = common_pb2.Download(url=origin.url("f.bin"), output_path=str(target))
            await upload_download(stub, download)
            task = d.storage.get(DownloadRequest.from_proto(download).task_id())
            assert task is not None and task.content_length == 100_000  # the fetch itself was allowed
        assert not target.exists()
    finally:
        await origin.stop()
