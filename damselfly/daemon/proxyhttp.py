"""HTTP pieces both halves of the daemon's proxy use: which headers stay on their hop, URLs fit
for a log line, and the error answers (``X-Dragonfly-Error-Type`` says whose error it is).

The proxy itself is ``proxy``; a GET served from the swarm, ``proxyswarm``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from loguru import logger

from damselfly.core.errors import InvalidArgument, PermissionDenied

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def redact(url: str) -> str:
    """``url`` fit for a log line: no user info, no query (signatures and tokens live there)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<bad url>"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path, "", ""))


def break_off(request: web.BaseRequest, why: str) -> None:
    """End a response that is under way so that the client sees an error, not a clean end."""
    logger.error("proxy: {}: response broken off", why)
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError(why)


def error_response(status: int, message: str, error_type: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={"X-Dragonfly-Error-Type": error_type})


def error_of(exc: BaseException) -> web.Response:
    if isinstance(exc, PermissionDenied):
        return error_response(403, str(exc), "proxy")
    status = getattr(exc, "status_code", 0) or (400 if isinstance(exc, InvalidArgument) else 502)
    return error_response(status, str(exc), getattr(exc, "error_type", "dfdaemon"))
