"""The http source's refusals carry what a retry needs (status, Retry-After), and a read retried
through the daemon's policy (``daemon.origin``) gets the origin's bytes once it answers."""

import pytest
from aiohttp import web
from loguru import logger

from damselfly.config import SourcePolicyConfig
from damselfly.core.errors import BackendError
from damselfly.daemon.origin import RetryPolicy, with_retries
from damselfly.plugins.source.http import HttpSource
from damselfly.security.policy import SourcePolicy
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(20)


async def test_a_503_with_retry_after_is_retried_then_read_whole():
    body = b"0123456789" * 100
    refusals = 2
    retried: list[int] = []

    async def origin(request: web.Request) -> web.StreamResponse:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        return web.Response(status=206, body=body, headers={"Content-Range": f"bytes 0-999/{len(body)}"})

    source = HttpSource(policy=SourcePolicy.from_config(SourcePolicyConfig(allow_loopback=True)))
    try:
        async with http_server(origin) as base:
            with pytest.raises(BackendError) as refused:
                _ = [c async for c in source.read(f"{base}/f", 0, len(body), {})]
            assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "0"

            async def read() -> bytes:
                return b"".join([c async for c in source.read(f"{base}/f", 0, len(body), {})])

            policy = RetryPolicy(retries=3, backoff=0.01, budget=1.0)
            got = await with_retries(policy, "f", logger, read, on_retry=retried.append)
            assert got == body and retried == [503]
    finally:
        await source.close()
