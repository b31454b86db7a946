"""Origin protection in the daemon: retries that back off and honour Retry-After, a cap on
reads per origin, and every back-to-source counted with its reason."""

import asyncio
import contextlib
import email.utils

import pytest
from aiohttp import web

from damselfly.core.errors import BackendError
from damselfly.daemon.origin import OriginGate, RetryPolicy, origin_of, retry_after
from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.runtime import Failed, Finished, TaskRuntime
from tests.helpers.daemons import daemon
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(30)

NOW = 1_800_000_000.0
POLICY = RetryPolicy(retries=3, backoff=1.0, budget=10.0)


def busy(status: int = 503, **headers: str) -> BackendError:
    return BackendError(f"origin answered {status}", status_code=status, headers=headers)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after({"Retry-After": "7"}, NOW) == 7.0
    assert retry_after({"retry-after": email.utils.formatdate(NOW + 12, usegmt=True)}, NOW) == 12.0
    assert retry_after({"Retry-After": email.utils.formatdate(NOW - 60, usegmt=True)}, NOW) == 0.0  # already past
    assert retry_after({"Retry-After": "soon"}, NOW) is None
    assert retry_after({}, NOW) is None


def test_a_busy_origin_is_retried_after_what_it_asks_for():
    assert POLICY.delay(busy(503, **{"Retry-After": "3"}), 0, 0.0, NOW, 0.5) == 3.0
    assert POLICY.delay(busy(429, **{"Retry-After": "0"}), 2, 0.0, NOW, 0.5) == 0.0


def test_without_retry_after_the_delay_doubles_and_is_jittered_within_half_of_it():
    for attempt, full in ((0, 1.0), (1, 2.0), (2, 4.0)):
        assert POLICY.delay(busy(502), attempt, 0.0, NOW, 0.0) == full / 2
        assert full / 2 < POLICY.delay(busy(502), attempt, 0.0, NOW, 0.99) < full  # type: ignore[operator]


def test_only_transient_failures_are_retried():
    for status in (429, 500, 502, 503, 504):
        assert POLICY.delay(busy(status), 0, 0.0, NOW, 0.5) is not None
    for status in (0, 400, 403, 404, 416):
        assert POLICY.delay(busy(status), 0, 0.0, NOW, 0.5) is None
    assert POLICY.delay(OSError("disk"), 0, 0.0, NOW, 0.5) is None


def test_retries_stop_after_their_count_or_their_budget():
    assert POLICY.delay(busy(503), 3, 0.0, NOW, 0.5) is None  # three retries done
    assert POLICY.delay(busy(503), 1, 9.5, NOW, 0.5) is None  # 1.5 s more would pass the 10 s budget
    assert POLICY.delay(busy(503, **{"Retry-After": "60"}), 0, 0.0, NOW, 0.5) is None  # asks for more than the budget


def test_an_origin_is_its_scheme_host_and_port():
    assert origin_of("http://example.com/a") == "http://example.com:80"
    assert origin_of("https://Example.com/b?x=1") == "https://example.com:443"
    assert origin_of("http://user:pw@10.0.0.1:8080/c") == "http://10.0.0.1:8080"
    gate = OriginGate(2)
    assert gate.limit("http://example.com/a") is gate.limit("http://example.com:80/b")
    assert gate.limit("http://example.com/a") is not gate.limit("http://example.com:81/a")


async def outcome(rt: TaskRuntime) -> Finished | Failed:
    return [e async for e in rt.follow() if isinstance(e, Finished | Failed)][-1]


async def test_a_download_waits_out_an_origin_answering_503_then_succeeds(tmp_path):
    content = bytes(range(256)) * 1024
    refusals = {"HEAD": 1, "GET": 2}

    async def origin(request: web.Request) -> web.StreamResponse:
        if refusals[request.method]:
            refusals[request.method] -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(content)), "Accept-Ranges": "bytes"})
        start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        return web.Response(
            status=206,
            body=content[start : end + 1],
            headers={"Content-Range": f"bytes {start}-{end}/{len(content)}"},
        )

    async with http_server(origin) as base, daemon(tmp_path) as d:
        rt = await d.start_download(DownloadRequest(url=f"{base}/file"))
        assert isinstance(await outcome(rt), Finished)
        assert b"".join([c async for c in d.storage.read_range(rt.task_id, 0, len(content))]) == content
        retried = d.metrics.source_retries.labels("503")._value.get()
        assert retried == 3 and refusals == {"HEAD": 0, "GET": 0}
        assert d.metrics.back_to_source.labels("no_scheduler")._value.get() == 1


async def test_an_origin_that_stays_busy_fails_the_download_after_the_retries(tmp_path):
    asked = 0

    async def origin(request: web.Request) -> web.StreamResponse:
        nonlocal asked
        asked += 1
        return web.Response(status=429, headers={"Retry-After": "0"})

    async with http_server(origin) as base, daemon(tmp_path, daemon={"source_retries": 2}) as d:
        result = await outcome(await d.start_download(DownloadRequest(url=f"{base}/file")))
        assert isinstance(result, Failed) and "429" in str(result.error)
        assert asked == 3  # the first try and two retries


async def test_every_back_to_source_is_counted_by_its_reason(tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(b"x" * 1000)

    async def origin(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"y" * 10)

    async with http_server(origin) as base, daemon(tmp_path) as d:
        assert isinstance(await outcome(await d.start_download(DownloadRequest(url=local.as_uri()))), Finished)
        assert isinstance(await outcome(await d.start_download(DownloadRequest(url=f"{base}/y"))), Finished)
        counted = {r: d.metrics.back_to_source.labels(r)._value.get() for r in ("local_file", "no_scheduler")}
        assert counted == {"local_file": 1, "no_scheduler": 1}


async def test_reads_of_one_origin_wait_for_the_daemons_cap(tmp_path):
    content = b"z" * 4096
    in_flight = 0
    most = 0
    overlapped = asyncio.Event()

    async def origin(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if in_flight > 1:
                overlapped.set()
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(len(content)), "Accept-Ranges": "bytes"})
            # held open until another read arrives, or long enough to show none will
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(overlapped.wait(), 0.3)
            return web.Response(status=206, body=content, headers={"Content-Range": f"bytes 0-4095/{len(content)}"})
        finally:
            in_flight -= 1

    async with http_server(origin) as base, daemon(tmp_path, daemon={"source_host_reads": 1}) as d:
        runs = [await d.start_download(DownloadRequest(url=f"{base}/{name}")) for name in ("a", "b", "c")]
        results = await asyncio.gather(*(outcome(rt) for rt in runs))
        assert all(isinstance(r, Finished) for r in results)
        assert most == 1 and not overlapped.is_set()
