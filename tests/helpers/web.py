"""A small aiohttp server for tests: an origin, a registry, or an attacker's endpoint."""

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from damselfly.core import ids
from damselfly.sandbox.origin import Origin


@asynccontextmanager
async def http_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str = "/{tail:.*}", host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """``handler`` answers every method on ``path``, on ``host`` at a free port; yields the base url."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def registry_blob(origin: Origin, repo: str, blob: bytes) -> tuple[str, str]:
    """Put ``blob`` where a registry serves it (``v2/REPO/blobs/DIGEST``) on ``origin``; its url,
    and the registry-bound task key a credentialed pull of it gets (as the proxy makes it)."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = origin.root / "v2" / repo / "blobs" / digest
    path.parent.mkdir(parents=True)
    path.write_bytes(blob)
    url = origin.url(f"v2/{repo}/blobs/{digest}")
    return url, ids.bound_blob_content("http", f"127.0.0.1:{origin.port}", ids.parse_blob_url(url))
