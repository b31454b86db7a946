"""Issue 25, credentials: the node's ambient cloud credentials never sign a request from the
network (nor one naming its own endpoint), the scheduler keeps and shows only allow-listed
request headers, and the sources' errors show no URL credentials."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from aiohttp import web
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from damselfly.config import load_settings
from damselfly.core.errors import BackendError, DamselflyError
from damselfly.plugins.source.http import HttpSource
from damselfly.rpc.wire import download_task_id
from damselfly.scheduler import start_scheduler
from damselfly.sdk.client import Client
from damselfly.security.policy import SourcePolicy
from tests.helpers.daemons import daemon
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(90)

AMBIENT_KEY = "AKIAAMBIENTNODEKEY01"
AMBIENT_TOKEN = "ambient-node-session-token"
LOOPBACK = {"sources": {"allow_loopback": False, "allow_networks": ["127.0.0.1/32"]}}


@asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server that records each request's headers and answers 403."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")

    async with http_server(handle) as base:
        yield base, seen


@pytest.fixture
def ambient_aws(monkeypatch, tmp_path):
    """The node's own AWS credentials, in its environment (botocore's default chain finds them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AMBIENT_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ambient-node-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", AMBIENT_TOKEN)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _signed(seen: list[dict[str, str]]) -> list[str]:
    return [
        h.get("authorization", "") + h.get("x-amz-security-token", "")
        for h in seen
        if "authorization" in h or "x-amz-security-token" in h
    ]


async def test_an_upload_api_s3_download_is_not_signed_with_the_nodes_ambient_credentials(tmp_path, ambient_aws):
    async with recording_server() as (endpoint, seen), daemon(tmp_path, security=LOOPBACK) as d:
        download = common_pb2.Download(
            url="s3://victim-private-bucket/secret.bin",
            object_storage=common_pb2.ObjectStorage(endpoint=endpoint, region="us-east-1"),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{d.upload_port}") as channel:
            up = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in up.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=30):
                    pass
        assert seen, "the request reached the endpoint"
        assert _signed(seen) == []  # unsigned: no Authorization, no X-Amz-Security-Token


async def test_a_local_request_naming_its_own_endpoint_is_not_signed_either(tmp_path, ambient_aws):
    async with recording_server() as (endpoint, seen), daemon(tmp_path, security=LOOPBACK) as d:
        async with Client(d.socket_path) as c:
            with pytest.raises(DamselflyError):
                await c.download(
                    "s3://bucket/key",
                    tmp_path / "out",
                    source_options={"object_storage": {"endpoint": endpoint, "region": "us-east-1"}},
                )
        assert seen and _signed(seen) == []


async def test_the_nodes_own_request_to_its_configured_endpoint_keeps_the_ambient_chain(tmp_path, ambient_aws):
    """The control: a local client of the node, to the endpoint the node's configuration names,
    is still signed with the node's ambient credentials (what the other tests must not see)."""
    async with recording_server() as (endpoint, seen):
        sources = {"s3": {"endpoint": endpoint, "region": "us-east-1"}}
        async with daemon(tmp_path, security=LOOPBACK, sources=sources) as d, Client(d.socket_path) as c:
            with pytest.raises(DamselflyError):
                await c.download("s3://bucket/key", tmp_path / "out")
        signed = _signed(seen)
        assert signed and all(AMBIENT_KEY in s and AMBIENT_TOKEN in s for s in signed)


# -- the scheduler keeps only allow-listed headers ------------------------------------------------

CUSTOM = {
    "X-Custom-Token": "custom-secret-1",
    "X-Auth-Token": "auth-secret-2",
    "PRIVATE-TOKEN": "gitlab-secret-3",
    "X-Api-Key": "api-secret-4",
    "X-Dragonfly-Registry-Token": "df-secret-5",
}
PUBLIC = {"Accept": "application/octet-stream", "User-Agent": "dfget/2.1", "X-Dragonfly-Tag": "t1"}


def _leaks(data: bytes) -> list[str]:
    text = data.decode(errors="replace")
    return [v for v in CUSTOM.values() if v in text]


def _host(name: str) -> common_pb2.Host:
    return common_pb2.Host(id=f"127.0.0.1-{name}", type=0, hostname=name, ip="127.0.0.1", port=4000)


async def test_the_scheduler_keeps_and_shows_only_allow_listed_headers():
    sched = await start_scheduler(
        load_settings(scheduler={"seed_wait": 1, "retry_interval": 0.05, "seed_trigger": False})
    )
    try:
        async with grpc.aio.insecure_channel(sched.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for name in ("a", "b"):
                await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=_host(name)))
            secret = common_pb2.Download(url="http://origin.example/file", request_header={**CUSTOM, **PUBLIC})
            task_id = download_task_id(secret)
            first = stub.AnnouncePeer()
            await first.write(
                scheduler_pb2.AnnouncePeerRequest(
                    host_id="127.0.0.1-a",
                    task_id=task_id,
                    peer_id="pa",
                    register_peer_request=scheduler_pb2.RegisterPeerRequest(download=secret),
                )
            )
            assert (await first.read()).WhichOneof("response") == "need_back_to_source_response"
            task = await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id="127.0.0.1-b", task_id=task_id))
            assert dict(task.request_header) == PUBLIC
            assert _leaks(task.SerializeToString()) == []
            peer = await stub.StatPeer(
                scheduler_pb2.StatPeerRequest(host_id="127.0.0.1-b", task_id=task_id, peer_id="pa")
            )
            assert _leaks(peer.SerializeToString()) == []
            st = sched.service.state
            assert _leaks(repr(vars(st)).encode()) == []  # the state keeps no registered request
            assert _leaks(repr(st.tasks[task_id].task).encode()) == []
            first.cancel()
    finally:
        await sched.stop()


# -- URLs in the sources' errors ------------------------------------------------------------------


def _http_source() -> HttpSource:
    source = HttpSource()
    source.policy = SourcePolicy.from_config(load_settings(security=LOOPBACK).security.sources)
    return source


async def test_a_sources_errors_show_no_url_credentials():
    async with recording_server() as (endpoint, seen):
        url = f"{endpoint.replace('//', '//user:hunter2@')}/f?X-Amz-Signature=sig-secret-6&token=tok-secret-7&a=1"
        source = _http_source()
        try:
            with pytest.raises(BackendError) as err:
                await source.stat(url, {})
        finally:
            await source.close()
        text = str(err.value)
        assert seen and "403" in text and "/f?" in text and "REDACTED" in text
        assert "hunter2" not in text and "sig-secret-6" not in text and "tok-secret-7" not in text
    # an origin that cannot be reached: aiohttp's own error names the url as well
    source = _http_source()
    try:
        with pytest.raises(BackendError) as err:
            await source.stat("http://127.0.0.1:1/f?X-Amz-Signature=sig-secret-8", {})
    finally:
        await source.close()
    assert "sig-secret-8" not in str(err.value) and "REDACTED" in str(err.value)
