"""The scheduler's side of issue 25, driven over its real gRPC listener: credentials stay with
their request, piece digests come only from whoever was sent to the source, caps, and
authorisation by certificate under mutual TLS."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from loguru import logger

from damselfly.config import load_settings
from damselfly.core import ids
from damselfly.core.task import PieceRecord
from damselfly.rpc.wire import download_task_id, piece_to_proto
from damselfly.scheduler import start_scheduler
from damselfly.security import certs, tls
from tests.helpers.waiting import wait_for
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(60)

# The scheduler takes a register only under its Download's own task id: the downloads of these
# tests name the one task TASK through their content_for_calculating_task_id, whatever their url.
TASK_KEY = "tests.security.test_scheduler: the one task"
TASK = ids.keyed_task_id(TASK_KEY)
MiB = 1 << 20
SECRETS = (
    "Bearer tok-alice-1",
    "session=cookie-alice-2",
    "amz-token-3",
    "AKIAALICE4",
    "aws-secret-5",
    "hf_alice_6",
    "Basic proxy-alice-7",
)
SHA_SEED = "sha256:" + "a" * 64
SHA_FAKE = "sha256:" + "f" * 64


def secret_download(url: str = "http://origin.example/private", **kw) -> common_pb2.Download:
    """A requester's download with every kind of credential the scheduler must not keep (a task
    named by its url, PRIVATE_TASK by default, as a triggered seed takes it)."""
    return common_pb2.Download(
        url=url,
        request_header={
            "Authorization": SECRETS[0],
            "Cookie": SECRETS[1],
            "X-Amz-Security-Token": SECRETS[2],
            "proxy-authorization": SECRETS[6],  # header names in any case
            "Accept": "application/octet-stream",
        },
        object_storage=common_pb2.ObjectStorage(region="eu", access_key_id=SECRETS[3], access_key_secret=SECRETS[4]),
        hugging_face=common_pb2.HuggingFace(token=SECRETS[5], revision="main"),
        **kw,
    )


def public_download(url: str = "http://origin.example/private") -> common_pb2.Download:
    """``secret_download``'s task without the credentials."""
    return common_pb2.Download(url=url, hugging_face=common_pb2.HuggingFace(revision="main"))


PRIVATE_TASK = download_task_id(public_download())


def download(url: str, **kw) -> common_pb2.Download:
    """A Download of ``url`` whose task id is TASK."""
    return common_pb2.Download(url=url, content_for_calculating_task_id=TASK_KEY, **kw)


def leaked(data: bytes | str) -> list[str]:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return [s for s in SECRETS if s in text]


def host(name: str, seed: bool = False, port: int = 4000) -> common_pb2.Host:
    return common_pb2.Host(
        id=f"127.0.0.1-{name}" + ("-seed" if seed else ""),
        type=1 if seed else 0,
        hostname=name,
        ip="127.0.0.1",
        port=port,
        network=common_pb2.Network(max_tx_bandwidth=8_000_000_000),
    )


def req(host_id: str, peer_id: str, task_id: str = TASK, **kw) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(host_id=host_id, task_id=task_id, peer_id=peer_id, **kw)


def register(download: common_pb2.Download) -> dict:
    return {"register_peer_request": scheduler_pb2.RegisterPeerRequest(download=download)}


def bts_piece(number: int, digest: str, length: int = 4 * MiB) -> dict:
    piece = piece_to_proto(PieceRecord(number, number * 4 * MiB, length, digest))
    return {
        "download_piece_back_to_source_finished_request": scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
            piece=piece
        )
    }


BTS_STARTED = {"download_peer_back_to_source_started_request": scheduler_pb2.DownloadPeerBackToSourceStartedRequest()}


def refused_total(server, reason: str) -> float:
    return server.service.metrics.refused.labels(reason)._value.get()


@pytest.fixture
async def sched(request):
    kind = getattr(request, "param", "native")
    settings = load_settings(
        scheduler={"seed_wait": 1, "retry_interval": 0.05, "grpc_server": kind, "seed_trigger": False}
    )
    server = await start_scheduler(settings)
    channel = grpc.aio.insecure_channel(server.address)
    yield scheduler_pb2_grpc.SchedulerStub(channel), server
    await channel.close()
    await server.stop()


# -- credentials stay with their request ------------------------------------------------------


@pytest.mark.parametrize("sched", ["native", "grpcio"], indirect=True)
async def test_credentials_are_absent_from_stat_task_parent_answers_and_logs(sched):
    stub, server = sched
    logged: list[str] = []
    logger.enable("damselfly")  # the package keeps quiet unless asked (damselfly/__init__.py)
    sink = logger.add(lambda m: logged.append(str(m)), level="DEBUG")
    try:
        for name in ("a", "b"):
            await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
        first = stub.AnnouncePeer()
        await first.write(req("127.0.0.1-a", "pa", PRIVATE_TASK, **register(secret_download())))
        assert (await first.read()).WhichOneof("response") == "need_back_to_source_response"
        await first.write(req("127.0.0.1-a", "pa", PRIVATE_TASK, **BTS_STARTED))
        await first.write(req("127.0.0.1-a", "pa", PRIVATE_TASK, **bts_piece(0, SHA_SEED)))
        second = stub.AnnouncePeer()
        await second.write(req("127.0.0.1-b", "pb", PRIVATE_TASK, **register(public_download())))
        answer = await second.read()
        (parent,) = answer.normal_task_response.candidate_parents
        assert parent.id == "pa" and [p.digest for p in parent.task.pieces] == [SHA_SEED]
        assert leaked(answer.SerializeToString()) == []
        assert dict(parent.task.request_header) == {"Accept": "application/octet-stream"}  # the rest kept

        task = await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id="127.0.0.1-b", task_id=PRIVATE_TASK))
        assert task.url == "http://origin.example/private" and leaked(task.SerializeToString()) == []
        peer = await stub.StatPeer(
            scheduler_pb2.StatPeerRequest(host_id="127.0.0.1-b", task_id=PRIVATE_TASK, peer_id="pa")
        )
        assert leaked(peer.SerializeToString()) == []
        # nothing the scheduler keeps holds them either
        st = server.service.state
        assert leaked(repr(vars(st))) == []  # (the request itself stays with its stream)
        assert leaked(repr(st.tasks[PRIVATE_TASK].task)) == []
        first.cancel()
        second.cancel()
    finally:
        logger.remove(sink)
        logger.disable("damselfly")
    assert logged and leaked("".join(logged)) == []


async def test_signed_url_credentials_are_not_shown():
    """A presigned URL's signature and a URL's user:password are credentials too."""
    server = await start_scheduler(load_settings(scheduler={"seed_trigger": False}))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
        url = "https://alice:pw-7@bucket.example/k?X-Amz-Signature=sig-8&X-Amz-Credential=cred-9&part=1"
        call = stub.AnnouncePeer()
        await call.write(req("127.0.0.1-a", "pa", **register(download(url=url))))
        await call.read()
        task = await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=TASK))
        for secret in ("pw-7", "sig-8", "cred-9"):
            assert secret not in task.url
        assert task.url.startswith("https://bucket.example/k?") and "part=1" in task.url
        call.cancel()
    finally:
        await channel.close()
        await server.stop()


class _Seed(dfdaemon_pb2_grpc.DfdaemonUploadServicer):
    """A daemon's upload API that records the DownloadTask requests it gets, and fails each at
    once (a seed trigger: the requester then goes to the source) or answers it done (a preheat)."""

    def __init__(self, fail: bool = True) -> None:
        self.requests: list = []
        self.fail = fail

    async def DownloadTask(self, request, context):
        self.requests.append(request)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the test seed reads nothing")
        return
        yield  # pragma: no cover


async def _seed_server(tls_cfg=None, fail: bool = True) -> tuple[grpc.aio.Server, int, _Seed]:
    seed = _Seed(fail)
    server = grpc.aio.server(interceptors=tls.server_interceptors(tls_cfg))
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(seed, server)
    port = tls.add_port(server, "127.0.0.1:0", tls_cfg)
    await server.start()
    return server, port, seed


@pytest.fixture
async def with_seed() -> AsyncIterator[tuple[scheduler_pb2_grpc.SchedulerStub, _Seed]]:
    """A plaintext scheduler that knows host ``a`` and a seed host whose upload API fails every
    trigger at once (the requester then reads the source)."""
    seed_server, seed_port, seed = await _seed_server()
    server = await start_scheduler(load_settings(scheduler={"seed_wait": 20, "retry_interval": 0.05}))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True, port=seed_port)))
        yield stub, seed
    finally:
        await channel.close()
        await server.stop()
        await seed_server.stop(0)


async def test_without_tls_the_seed_trigger_carries_no_credentials_and_the_requester_reads_itself(with_seed):
    stub, seed = with_seed
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "pa", PRIVATE_TASK, **register(secret_download())))
    # the seed was asked, without the credentials; it failed, so the requester reads the source
    answer = await asyncio.wait_for(call.read(), 10)
    assert answer.WhichOneof("response") == "need_back_to_source_response"
    (trigger,) = seed.requests
    assert trigger.download.url == "http://origin.example/private" and trigger.download.need_back_to_source
    assert dict(trigger.download.request_header) == {"Accept": "application/octet-stream"}
    assert leaked(trigger.SerializeToString()) == []
    call.cancel()


# -- piece digests only from whoever was sent to the source ----------------------------------


async def test_a_fake_back_to_source_report_is_ignored_and_the_honest_parent_stays(sched):
    stub, server = sched
    for name in ("a", "c"):
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True)))
    dl = download(url="http://origin.example/x", actual_content_length=8 * MiB, actual_piece_length=4 * MiB)
    seed = stub.AnnouncePeer()
    seed_dl = common_pb2.Download()
    seed_dl.CopyFrom(dl)
    seed_dl.need_back_to_source = True
    await seed.write(req("127.0.0.1-s-seed", "ps", **register(seed_dl)))
    assert (await seed.read()).WhichOneof("response") == "need_back_to_source_response"
    await seed.write(req("127.0.0.1-s-seed", "ps", **BTS_STARTED))
    await seed.write(req("127.0.0.1-s-seed", "ps", **bts_piece(0, SHA_SEED)))
    # the attacker gets the seed as its parent, then claims it read piece 0 (and 1) itself
    evil = stub.AnnouncePeer()
    await evil.write(req("127.0.0.1-a", "pevil", **register(dl)))
    assert [p.id for p in (await evil.read()).normal_task_response.candidate_parents] == ["ps"]
    await evil.write(req("127.0.0.1-a", "pevil", **bts_piece(0, SHA_FAKE)))
    await evil.write(req("127.0.0.1-a", "pevil", **bts_piece(1, SHA_FAKE)))

    await wait_for(lambda: refused_total(server, "digest") >= 2, 10, "the fake reports to be refused")
    task = await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=TASK))
    assert [(p.number, p.digest) for p in task.pieces] == [(0, SHA_SEED)]
    # a new child gets the honest seed, with the seed's digest to check its pieces against
    child = stub.AnnouncePeer()
    await child.write(req("127.0.0.1-c", "pc", **register(dl)))
    parents = {p.id: p for p in (await child.read()).normal_task_response.candidate_parents}
    assert "ps" in parents
    assert [(p.number, p.digest) for p in parents["ps"].task.pieces] == [(0, SHA_SEED)]
    for call in (seed, evil, child):
        call.cancel()


async def test_a_seeds_digest_wins_over_a_peer_sent_to_the_source_and_bad_reports_are_ignored(sched):
    """A peer can always get itself sent to the source (no seed, or asking for it): a seed's
    digest then replaces its; a malformed digest or a piece outside the layout sets nothing."""
    stub, server = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True)))
    dl = download(url="http://origin.example/y", actual_content_length=8 * MiB, actual_piece_length=4 * MiB)
    peer = stub.AnnouncePeer()
    await peer.write(req("127.0.0.1-a", "pa", **register(dl)))
    assert (await peer.read()).WhichOneof("response") == "need_back_to_source_response"  # no parent, no trigger
    await peer.write(req("127.0.0.1-a", "pa", **bts_piece(0, SHA_FAKE)))
    await peer.write(req("127.0.0.1-a", "pa", **bts_piece(1, "md5:abc")))  # not a piece digest
    await peer.write(req("127.0.0.1-a", "pa", **bts_piece(7, SHA_FAKE)))  # no piece 7 in 8 MiB

    async def stat() -> list[tuple[int, str]]:
        task = await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=TASK))
        return [(p.number, p.digest) for p in task.pieces]

    async def until(expected) -> None:
        async def there() -> bool:
            return await stat() == expected

        await wait_for(there, 10, f"the task's pieces to be {expected}")

    await until([(0, SHA_FAKE)])
    seed_dl = common_pb2.Download()
    seed_dl.CopyFrom(dl)
    seed_dl.need_back_to_source = True
    seed = stub.AnnouncePeer()
    await seed.write(req("127.0.0.1-s-seed", "ps", **register(seed_dl)))
    await seed.read()
    await seed.write(req("127.0.0.1-s-seed", "ps", **bts_piece(0, SHA_SEED)))
    await until([(0, SHA_SEED)])
    # a peer sent to the source later does not overwrite the seed's
    await peer.write(req("127.0.0.1-a", "pa", **bts_piece(0, "sha256:" + "b" * 64)))
    await peer.write(req("127.0.0.1-a", "pa", **bts_piece(1, "sha256:" + "c" * 64)))
    await until([(0, SHA_SEED), (1, "sha256:" + "c" * 64)])
    assert refused_total(server, "digest") == 2
    peer.cancel()
    seed.cancel()


async def test_a_metadata_only_claim_is_a_parent_only_once_every_digest_is_known(sched):
    stub, _ = sched
    for name in ("m", "c", "d"):
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
    dl = download(url="http://origin.example/z", actual_content_length=8 * MiB, actual_piece_length=4 * MiB)
    claim = common_pb2.Download()
    claim.CopyFrom(dl)
    claim.metadata_only = True
    m = stub.AnnouncePeer()
    await m.write(req("127.0.0.1-m", "pm", **register(claim)))
    assert (await m.read()).WhichOneof("response") == "metadata_only_response"
    await m.write(req("127.0.0.1-m", "pm", download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest()))
    assert await m.read() == grpc.aio.EOF
    # nobody can check what pm would serve: c is not given it, and reads the source
    c = stub.AnnouncePeer()
    await c.write(req("127.0.0.1-c", "pc", **register(dl)))
    assert (await c.read()).WhichOneof("response") == "need_back_to_source_response"
    await c.write(req("127.0.0.1-c", "pc", **BTS_STARTED))
    await c.write(req("127.0.0.1-c", "pc", **bts_piece(0, SHA_SEED)))
    await c.write(req("127.0.0.1-c", "pc", **bts_piece(1, SHA_SEED)))

    async def complete() -> bool:
        return len((await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=TASK))).pieces) == 2

    await wait_for(complete, 10, "both digests")
    # every piece's digest is known now: children can check pm's pieces, so it is offered
    d = stub.AnnouncePeer()
    await d.write(req("127.0.0.1-d", "pd", **register(dl)))
    parents = {p.id for p in (await d.read()).normal_task_response.candidate_parents}
    assert parents == {"pm", "pc"}
    for call in (m, c, d):
        call.cancel()


# -- a task id is its download's ----------------------------------------------------------------


@pytest.mark.parametrize("sched", ["native", "grpcio"], indirect=True)
async def test_a_register_under_another_downloads_task_id_is_refused(sched):
    """Task poisoning: a peer registers the victim URL's task id with its own URL (to be sent
    to the source and have its bytes' digests become the task's), or claims to hold it."""
    stub, server = sched
    await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    victim = common_pb2.Download(url="http://origin.example/victim.tar")
    victim_id = download_task_id(victim)
    evil = common_pb2.Download(url="http://attacker.example/evil.tar", need_back_to_source=True)
    claim = common_pb2.Download(url="http://attacker.example/evil.tar", metadata_only=True)
    for n, dl in enumerate((evil, claim, common_pb2.Download(url="no scheme, no host"))):
        call = stub.AnnouncePeer()
        await call.write(req("127.0.0.1-a", f"pevil{n}", victim_id, **register(dl)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert details.startswith("register refused: ") and "\n" not in details
        assert ("is not its download's" in details) == (n < 2), details
    assert refused_total(server, "task_id") == 3
    st = server.service.state
    assert victim_id not in st.tasks and not st.peers
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=victim_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the victim's own download is taken under its id
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "pvictim", victim_id, **register(victim)))
    assert (await call.read()).WhichOneof("response") == "need_back_to_source_response"
    assert st.tasks[victim_id].task.url == victim.url
    call.cancel()


async def test_no_seed_is_asked_to_fill_a_task_id_the_request_chose(with_seed):
    """A content_for_calculating_task_id its url does not imply (a local client's choice, or an
    attacker's preimage of a victim's id) is never forwarded to a seed, which would store that
    url's bytes under the id; a cache task's key, its url, is."""
    stub, seed = with_seed
    victim_id = download_task_id(common_pb2.Download(url="http://origin.example/victim.tar"))
    preimage = "http://origin.example/victim.tar" + ids.STANDARD_TASK_TYPE
    chosen = common_pb2.Download(url="http://attacker.example/evil.tar", content_for_calculating_task_id=preimage)
    assert download_task_id(chosen) == ids.keyed_task_id(preimage) != victim_id  # a key names no url's task
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "pa", download_task_id(chosen), **register(chosen)))
    answer = await asyncio.wait_for(call.read(), 10)
    assert answer.WhichOneof("response") == "need_back_to_source_response" and seed.requests == []
    call.cancel()
    cache_url = "damselfly-cache://" + "ab" * 32
    cached = common_pb2.Download(url=cache_url, content_for_calculating_task_id=cache_url)
    call = stub.AnnouncePeer()
    await call.write(req("127.0.0.1-a", "pc", download_task_id(cached), **register(cached)))
    await asyncio.wait_for(call.read(), 10)  # the test seed fails at once
    assert [r.download.url for r in seed.requests] == [cache_url]
    call.cancel()


# -- caps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["native", "grpcio"])
async def test_caps_on_hosts_tasks_and_peers(kind):
    settings = load_settings(
        scheduler={"grpc_server": kind, "seed_trigger": False},
        security={"limits": {"max_hosts": 2, "max_tasks": 2, "max_peers": 2}},
    )
    server = await start_scheduler(settings)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for name in ("a", "b"):
            await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host(name)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("c")))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_hosts" in err.value.details()
        await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))  # a known host goes on

        calls = []

        def task_download(n: str) -> common_pb2.Download:  # a task of its own for each n
            return common_pb2.Download(url=f"http://origin.example/{n}")

        async def register_one(peer_id: str, n: str) -> scheduler_pb2.AnnouncePeerResponse:
            call = stub.AnnouncePeer()
            calls.append(call)
            dl = task_download(n)
            await call.write(req("127.0.0.1-a", peer_id, download_task_id(dl), **register(dl)))
            return await call.read()

        assert (await register_one("p1", "1")).WhichOneof("response") == "need_back_to_source_response"
        assert (await register_one("p2", "2")).WhichOneof("response") == "need_back_to_source_response"
        for peer_id, n, cap in (("p3", "3", "max_tasks"), ("p4", "1", "max_peers")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await register_one(peer_id, n)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and cap in err.value.details()
        st = server.service.state
        assert set(st.tasks) == {download_task_id(task_download(n)) for n in "12"}
        assert set(st.peers) == {"p1", "p2"}
        assert refused_total(server, "limit") == 3
        for call in calls:
            call.cancel()
    finally:
        await channel.close()
        await server.stop()


# -- authorisation by certificate (mutual TLS) ------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root / "ca")
    made = {"scheduler": certs.issue(root / "ca", root, "scheduler", ips=["127.0.0.1"], roles=["scheduler"])}
    for name in ("a", "b"):
        made[name] = certs.issue(root / "ca", root, name, ips=["127.0.0.1"], dns=[name], roles=["peer"])
    made["s"] = certs.issue(root / "ca", root, "s", ips=["127.0.0.1"], dns=["s"], roles=["seed"])
    made["client"] = certs.issue(root / "ca", root, "client", ips=["127.0.0.1"], roles=["client"])
    return root, made


def tls_cfg(pki, name: str) -> dict:
    root, made = pki
    return {"ca": root / "ca" / certs.CA_CERT, "cert": made[name].cert, "key": made[name].key}


def stub_as(pki, address: str, name: str) -> tuple[grpc.aio.Channel, scheduler_pb2_grpc.SchedulerStub]:
    cfg = load_settings(security={"tls": tls_cfg(pki, name)}).security.tls
    channel = tls.grpc_channel(address, cfg)
    return channel, scheduler_pb2_grpc.SchedulerStub(channel)


@pytest.fixture
async def tls_sched(request, pki):
    kind = getattr(request, "param", "native")
    settings = load_settings(
        scheduler={"grpc_server": kind, "seed_trigger": False, "seed_wait": 1, "retry_interval": 0.05},
        security={"tls": tls_cfg(pki, "scheduler")},
    )
    server = await start_scheduler(settings)
    channels = {}
    stubs = {}
    for name in ("a", "b", "s", "client"):
        channels[name], stubs[name] = stub_as(pki, server.address, name)
    yield stubs, server
    for ch in channels.values():
        await ch.close()
    await server.stop()


async def _failure(coro) -> tuple[grpc.StatusCode, str]:
    """The status ``coro`` fails with. (The error is not kept: a kept one holds its call, and
    the call its TLS connection, past the channel's close.)"""
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call did not fail")


async def _denied(coro, *words: str) -> None:
    """``coro`` fails with PERMISSION_DENIED, its details naming ``words``."""
    code, details = await _failure(coro)
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    for w in words:
        assert w in details, details


@pytest.mark.parametrize("tls_sched", ["native", "grpcio"], indirect=True)
async def test_under_tls_a_host_announces_only_itself_and_only_a_seed_certificate_a_seed(tls_sched):
    stubs, server = tls_sched
    a, s = stubs["a"], stubs["s"]
    await a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    # a hijack of b's host id, with b's name or with a's own
    await _denied(a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("b"))), "does not name", "hostname b")
    forged = host("a")
    forged.id = "127.0.0.1-b"
    await _denied(a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=forged)), "host id 127.0.0.1-b")
    # a fake seed: a peer certificate announcing a seed host
    await _denied(a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a", seed=True))), "role seed")
    await s.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True)))
    hosts = {h.id: h.type for h in (await a.ListHosts(scheduler_pb2.ListHostsRequest())).hosts}
    assert hosts == {"127.0.0.1-a": 0, "127.0.0.1-s-seed": 1}
    assert refused_total(server, "permission") == 3


@pytest.mark.parametrize("tls_sched", ["native", "grpcio"], indirect=True)
async def test_under_tls_peers_and_deletes_only_for_the_callers_own_host(tls_sched):
    stubs, server = tls_sched
    a, b = stubs["a"], stubs["b"]
    await a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
    await b.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("b")))
    # a registers a peer for b's host: refused on the stream
    hijack = a.AnnouncePeer()
    await hijack.write(req("127.0.0.1-b", "px", **register(download(url="http://origin.example/x"))))
    await _denied(hijack.read(), "AnnouncePeer", "127.0.0.1-b")
    own = a.AnnouncePeer()
    await own.write(req("127.0.0.1-a", "pa", **register(download(url="http://origin.example/x"))))
    assert (await own.read()).WhichOneof("response") == "need_back_to_source_response"
    # b deletes a's peer, a's task entry and a's host: each refused, nothing is gone
    await _denied(b.DeletePeer(scheduler_pb2.DeletePeerRequest(host_id="127.0.0.1-b", task_id=TASK, peer_id="pa")))
    await _denied(b.DeleteTask(scheduler_pb2.DeleteTaskRequest(host_id="127.0.0.1-a", task_id=TASK)))
    await _denied(b.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id="127.0.0.1-a")), "DeleteHost", "127.0.0.1-a")
    st = server.service.state
    assert "pa" in st.peers and "127.0.0.1-a" in st.hosts
    # the owner may
    await a.DeletePeer(scheduler_pb2.DeletePeerRequest(host_id="127.0.0.1-a", task_id=TASK, peer_id="pa"))
    await a.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id="127.0.0.1-a"))
    assert "pa" not in st.peers and set(st.hosts) == {"127.0.0.1-b"}
    own.cancel()


@pytest.mark.parametrize("tls_sched", ["native", "grpcio"], indirect=True)
async def test_under_tls_a_connection_without_a_client_certificate_is_refused(tls_sched, pki):
    stubs, server = tls_sched
    root, _ = pki
    no_cert = grpc.ssl_channel_credentials(root_certificates=(root / "ca" / certs.CA_CERT).read_bytes())
    for channel in (grpc.aio.secure_channel(server.address, no_cert), grpc.aio.insecure_channel(server.address)):
        try:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            code, _ = await _failure(stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await channel.close()
    # a certificate of the cluster gets in
    assert not (await stubs["a"].ListHosts(scheduler_pb2.ListHostsRequest())).hosts


async def test_under_tls_the_seed_gets_the_requesters_credentials_and_nobody_keeps_them(pki):
    seed_cfg = load_settings(security={"tls": tls_cfg(pki, "s")}).security.tls
    seed_server, seed_port, seed = await _seed_server(seed_cfg)
    settings = load_settings(
        scheduler={"seed_wait": 20, "retry_interval": 0.05}, security={"tls": tls_cfg(pki, "scheduler")}
    )
    server = await start_scheduler(settings)
    a_channel, a = stub_as(pki, server.address, "a")
    s_channel, s = stub_as(pki, server.address, "s")
    try:
        await a.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a")))
        await s.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True, port=seed_port)))
        call = a.AnnouncePeer()
        await call.write(req("127.0.0.1-a", "pa", PRIVATE_TASK, **register(secret_download())))
        answer = await asyncio.wait_for(call.read(), 10)  # the test seed fails: back to source
        assert answer.WhichOneof("response") == "need_back_to_source_response"
        (trigger,) = seed.requests
        assert sorted(leaked(trigger.SerializeToString())) == sorted(SECRETS)  # to the one seed, over mTLS
        task = await a.StatTask(scheduler_pb2.StatTaskRequest(task_id=PRIVATE_TASK))
        assert leaked(task.SerializeToString()) == []
        assert leaked(repr(vars(server.service.state))) == []
        call.cancel()
    finally:
        await a_channel.close()
        await s_channel.close()
        await server.stop()
        await seed_server.stop(0)


@pytest.mark.parametrize("tls_sched", ["native", "grpcio"], indirect=True)
async def test_under_tls_only_an_operators_certificate_may_preheat(tls_sched):
    stubs, _ = tls_sched
    file = scheduler_pb2.PreheatFileRequest(url="http://origin.example/f", scope="all_peers")
    await _denied(stubs["a"].PreheatFile(file), "PreheatFile", "role client")
    image = scheduler_pb2.PreheatImageRequest(url="http://registry.example/team/app:v1")
    await _denied(stubs["s"].PreheatImage(image), "PreheatImage")
    # the operator's tool gets past the check (and there is no host to preheat on)
    code, details = await _failure(stubs["client"].PreheatFile(file))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no host matches" in details


@pytest.mark.parametrize("kind", ["native", "grpcio"])
async def test_a_scheduler_bound_beyond_loopback_without_tls_says_it_is_unauthenticated(kind):
    logged: list[str] = []
    logger.enable("damselfly")
    sink = logger.add(lambda m: logged.append(str(m)), level="WARNING")
    try:
        for ip in ("127.0.0.1", "0.0.0.0"):
            server = await start_scheduler(load_settings(scheduler={"listen_ip": ip, "grpc_server": kind}))
            await server.stop()
            warned = [m for m in logged if "WITHOUT TLS" in m and "scheduler" in m]
            assert len(warned) == (ip == "0.0.0.0"), logged
    finally:
        logger.remove(sink)
        logger.disable("damselfly")


@pytest.mark.parametrize("secure", [False, True])
async def test_preheat_credentials_go_only_to_the_seed_and_only_over_tls(pki, secure):
    def cfg(name: str):
        return load_settings(security={"tls": tls_cfg(pki, name)}).security.tls if secure else None

    seed_server, seed_port, seed = await _seed_server(cfg("s"), fail=False)
    peer_server, peer_port, peer = await _seed_server(cfg("a"), fail=False)
    security = {"tls": tls_cfg(pki, "scheduler")} if secure else {}
    server = await start_scheduler(load_settings(scheduler={"seed_trigger": False}, security=security))
    channels = []

    def stub(name: str) -> scheduler_pb2_grpc.SchedulerStub:
        if secure:
            channel, made = stub_as(pki, server.address, name)
        else:
            channel = grpc.aio.insecure_channel(server.address)
            made = scheduler_pb2_grpc.SchedulerStub(channel)
        channels.append(channel)
        return made

    try:
        await stub("a").AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("a", port=peer_port)))
        await stub("s").AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host("s", seed=True, port=seed_port)))
        header = {"Authorization": SECRETS[0], "Cookie": SECRETS[1], "Accept": "*/*"}
        await stub("client").PreheatFile(
            scheduler_pb2.PreheatFileRequest(url="http://origin.example/f", scope="all_peers", header=header)
        )
        (to_seed,), (to_peer,) = seed.requests, peer.requests
        assert to_seed.download.need_back_to_source and not to_peer.download.need_back_to_source
        assert leaked(to_peer.SerializeToString()) == []  # the host that fetches through the swarm: never
        assert dict(to_peer.download.request_header) == {"Accept": "*/*"}
        assert sorted(leaked(to_seed.SerializeToString())) == (sorted(SECRETS[:2]) if secure else [])
    finally:
        for channel in channels:
            await channel.close()
        await server.stop()
        await seed_server.stop(0)
        await peer_server.stop(0)


async def test_preheat_resolves_an_image_only_where_the_source_policy_allows():
    """The scheduler reads an image's manifest itself: through the source policy, so a preheat
    naming a registry on a refused address (here loopback) reaches nothing."""
    from aiohttp import web

    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=404)

    sched = await start_scheduler(load_settings(security={"sources": {"allow_loopback": False}}))
    try:
        async with http_server(record) as base, grpc.aio.insecure_channel(sched.address) as channel:
            port = base.rsplit(":", 1)[1]
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PreheatImage(scheduler_pb2.PreheatImageRequest(url=f"oci://127.0.0.1:{port}/team/app:v1"))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "allow_loopback" in (refused.value.details() or "")
            # a name that resolves to loopback is refused where it connects
            with pytest.raises(grpc.aio.AioRpcError) as by_name:
                await stub.PreheatImage(scheduler_pb2.PreheatImageRequest(url=f"oci://localhost:{port}/team/app:v1"))
            assert by_name.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert seen == []
    finally:
        await sched.stop()
