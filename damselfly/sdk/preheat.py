"""Preheat through a scheduler: put an image or a file on the swarm's hosts ahead of use.

A file is one ``PreheatFile``; an image (``oci://REGISTRY/REPO:TAG``, or a registry's
``/v2/.../manifests/...`` url) is ``PreheatImage``, then ``StatImage`` for the report of
which layers are done and how many each host caches. The channel uses mutual TLS when
``tls`` is enabled (a certificate with role client): preheat is an operator's act.
gRPC failures are left to the caller (``grpc.aio.AioRpcError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from damselfly.rpc.wire import duration

if TYPE_CHECKING:
    from damselfly.config import TlsConfig


def is_image(url: str) -> bool:
    """``url`` names an image (preheated layer by layer), not a file."""
    return url.startswith("oci://") or ("/v2/" in url and "/manifests/" in url)


async def preheat(
    address: str,
    tls: TlsConfig | None,
    url: str,
    *,
    scope: str,
    platform: str = "linux/amd64",
    username: str = "",
    password: str = "",
    headers: dict[str, str] | None = None,
    tag: str = "",
    application: str = "",
    ips: Sequence[str] = (),
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Preheat ``url`` on the hosts ``scope`` (and ``ips``) names, through the scheduler at
    ``address``; returns the report: ``url`` and ``scope``, and for an image its ``layers``
    (url, finished) and ``hosts`` (host name: blobs cached)."""
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

    from damselfly.security import tls as mtls

    common: dict[str, Any] = {"url": url, "tag": tag, "application": application, "header": dict(headers or {})}
    async with mtls.grpc_channel(address, tls) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        if not is_image(url):
            await stub.PreheatFile(
                scheduler_pb2.PreheatFileRequest(scope=scope, ips=list(ips), timeout=duration(timeout), **common),
                timeout=timeout + 30,
            )
            return {"url": url, "scope": scope}
        auth: dict[str, Any] = {"username": username, "password": password, "platform": platform}
        await stub.PreheatImage(
            scheduler_pb2.PreheatImageRequest(scope=scope, ips=list(ips), timeout=duration(timeout), **common, **auth),
            timeout=timeout + 30,
        )
        stat = await stub.StatImage(scheduler_pb2.StatImageRequest(**common, **auth), timeout=120)
        return {
            "url": url,
            "scope": scope,
            "layers": [{"url": layer.url, "finished": layer.is_finished} for layer in stat.image.layers],
            "hosts": {p.hostname: len(p.cached_layers) for p in stat.peers},
        }
