"""Task ids an attacker cannot steer, driven through a real daemon's local socket: a content key
never names a URL's task, a registry-bound blob key is no local client's, and a request that names
its own source endpoint gets its own task (origins on 127.0.0.1: the suite allows loopback)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from damselfly.core import ids
from damselfly.core.errors import PermissionDenied
from damselfly.daemon.request import DownloadRequest
from damselfly.sandbox.origin import Origin as CountingOrigin
from damselfly.sdk.client import Client
from tests.helpers.daemons import daemon
from tests.helpers.web import http_server, registry_blob


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[CountingOrigin]:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "victim.bin").write_bytes(b"the victim's own bytes\n" * 5000)
    (root / "evil.bin").write_bytes(b"the attacker's bytes!!\n" * 5000)
    o = CountingOrigin(root)
    await o.start()
    yield o
    await o.stop()


def test_a_content_key_never_names_a_urls_task():
    victim = DownloadRequest(url="http://registry.example/files/app.tar")
    preimage = ids.filter_query_params(victim.url, ids.DEFAULT_FILTERED_QUERY_PARAMS) + ids.STANDARD_TASK_TYPE
    assert ids.content_task_id(preimage) == victim.task_id()  # upstream's content id is the url's
    keyed = DownloadRequest(url="http://attacker.example/evil.bin", content_for_calculating_task_id=preimage)
    assert keyed.task_id() == ids.keyed_task_id(preimage) != victim.task_id()


async def test_a_local_content_key_preimage_does_not_fill_the_victim_urls_task(tmp_path, origin):
    """The attacker, a user of this node, keys its own URL with the string whose sha256 is the
    victim URL's task id: it gets a task of its own, and the victim's URL still gives the victim's bytes."""
    victim_url, evil_url = origin.url("victim.bin"), origin.url("evil.bin")
    victim = DownloadRequest(url=victim_url)
    preimage = ids.filter_query_params(victim_url, ids.DEFAULT_FILTERED_QUERY_PARAMS) + ids.STANDARD_TASK_TYPE
    assert ids.content_task_id(preimage) == victim.task_id()
    async with daemon(tmp_path) as d, Client(d.socket_path) as c:
        evil = await c.download(evil_url, tmp_path / "evil.out", content_for_calculating_task_id=preimage)
        assert evil.task_id == ids.keyed_task_id(preimage) != victim.task_id()
        assert d.storage.get(victim.task_id()) is None
        got = await c.download(victim_url, tmp_path / "victim.out")
        assert got.task_id == victim.task_id()
    assert (tmp_path / "victim.out").read_bytes() == (origin.root / "victim.bin").read_bytes()
    assert (tmp_path / "evil.out").read_bytes() == (origin.root / "evil.bin").read_bytes()


@pytest.mark.parametrize("own_url", [True, False])
async def test_a_local_client_may_not_use_a_registry_bound_blob_key(tmp_path, origin, own_url):
    """The key a credentialed pull through the proxy gets would read a private blob from the swarm
    without showing the registry any credentials: refused over the local socket, whatever the url."""
    blob_url, bound = registry_blob(origin, "team/secret", b"a private layer\n" * 1000)
    for key in (bound, bound.replace("oci-blob+http://", "oci-blob://")):  # the older form too
        async with daemon(tmp_path) as d, Client(d.socket_path) as c:
            with pytest.raises(PermissionDenied, match="registry-bound blob key") as err:
                await c.download(
                    blob_url if own_url else origin.url("victim.bin"),
                    tmp_path / "out",
                    content_for_calculating_task_id=key,
                    disable_back_to_source=True,
                )
            assert "\n" not in str(err.value)
            assert [t.url for t in d.storage.tasks()] == []
    assert origin.stats.by_method == {}
    assert not (tmp_path / "out").exists()


def test_a_bound_blob_key_names_its_registrys_scheme():
    blob = ids.parse_blob_url("https://registry.example/v2/team/app/blobs/sha256:" + "ab" * 32)
    assert ids.bound_blob_content("https", "registry.example", blob) != ids.bound_blob_content(
        "http", "registry.example", blob
    )
    https = DownloadRequest(url="https://registry.example/v2/team/app/blobs/sha256:" + "ab" * 32)
    plain = DownloadRequest(url="http://registry.example/v2/team/app/blobs/sha256:" + "ab" * 32)
    from damselfly.security.admission import derived_task_key

    assert derived_task_key(https.url) != derived_task_key(plain.url)


def test_a_source_endpoint_override_names_another_task():
    plain = DownloadRequest(url="s3://bucket/key")
    for options in (
        {"object_storage": {"endpoint": "http://evil.example"}},
        {"object_storage": {"insecure_skip_verify": True}},
        {"hugging_face": {"base_url": "http://hub.evil"}},
    ):
        assert DownloadRequest(url=plain.url, source_options=options).task_id() != plain.task_id()
    assert DownloadRequest(url=plain.url, source_options={"object_storage": {"region": "eu"}}).task_id() == (
        plain.task_id()
    )


@asynccontextmanager
async def rewriting_s3(target: str, bucket: str, evil_bucket: str) -> AsyncIterator[str]:
    """The attacker's S3 endpoint: answers for ``bucket`` with ``evil_bucket``'s objects (of the real
    S3 API at ``target``, which checks no signatures)."""

    async def forward(request: web.Request) -> web.Response:
        path = request.path_qs.replace(f"/{bucket}", f"/{evil_bucket}", 1)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(request.method, target + path, headers=headers, data=await request.read()) as r,
        ):
            body = await r.read()
            keep = ("content-type", "content-range", "etag", "last-modified", "accept-ranges", "x-amz-request-id")
            out = web.Response(
                status=r.status, body=body, headers={k: v for k, v in r.headers.items() if k.lower() in keep}
            )
            if request.method == "HEAD":
                out.headers["Content-Length"] = r.headers.get("Content-Length", "0")
            return out

    async with http_server(forward) as base:
        yield base


@pytest.mark.integration
async def test_a_download_from_an_evil_s3_endpoint_does_not_change_the_plain_urls_bytes(tmp_path, damselfly_s3):
    """The node's S3 is configured (sources.s3); a local user asks for the same s3:// url from an
    endpoint of its own, which serves other bytes: that is a task of its own, and a later plain
    download of the url gets the real object."""
    s3 = damselfly_s3
    bucket, evil_bucket = s3.bucket(), s3.bucket()
    real, fake = b"the real object\n" * 4000, b"a poisoned object\n" * 4000
    s3.client().put_object(Bucket=bucket, Key="model.bin", Body=real)
    s3.client().put_object(Bucket=evil_bucket, Key="model.bin", Body=fake)
    url = f"s3://{bucket}/model.bin"
    configured = {"s3": {"endpoint": s3.endpoint, "access_key_id": "damselfly-test", "access_key_secret": "x"}}
    async with rewriting_s3(s3.endpoint, bucket, evil_bucket) as evil, daemon(tmp_path, sources=configured) as d:
        async with Client(d.socket_path) as c:
            options = {"object_storage": {"endpoint": evil, "access_key_id": "a", "access_key_secret": "b"}}
            poisoned = await c.download(url, tmp_path / "evil.out", source_options=options)
            assert (tmp_path / "evil.out").read_bytes() == fake  # the attacker got what its endpoint said
            plain = await c.download(url, tmp_path / "plain.out")
        assert plain.task_id == DownloadRequest(url=url).task_id() != poisoned.task_id
        assert (tmp_path / "plain.out").read_bytes() == real
        assert d.storage.get(plain.task_id).content_length == len(real)
