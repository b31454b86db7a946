"""A GET the daemon's proxy serves from the swarm: the client's right to a registry blob checked,
the download started for it, and its bytes streamed to the client piece by piece as they land.

Private images stay private: a registry blob is a path ``/v2/<name>/blobs/<digest>``
as ``ids.parse_blob_path`` reads it (anchored, the OCI name grammar), the one parser
both the credential check and the task id use. Before such a blob is served from the
swarm, the client's own credentials (its ``Authorization`` and ``Cookie``, or none)
are checked against the registry with a HEAD of that blob, remembered
``auth_cache_ttl`` seconds per registry, repository and credentials. A client the
registry refuses gets the registry's answer (401 and its ``WWW-Authenticate``), even
when the blob is on this disk. The blob of a pull with credentials is a task bound to
its registry and repository (``ids.bound_blob_content``), so a registry that says yes
to everything authorises only its own copy. A whole blob is hashed as it is sent:
bytes that do not match its digest break the response off before its last piece.

A ``Range`` request is answered 206 and fetches only the pieces that overlap it. The client's
headers (its credentials with them) go into the download's request headers, for that
download only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from loguru import logger

from damselfly.core import ids
from damselfly.core.errors import BackendError, DamselflyError, InvalidArgument, PermissionDenied, StorageError
from damselfly.core.piece import MAX_PIECE_LENGTH, Layout
from damselfly.core.task import TaskState
from damselfly.daemon.proxyhttp import HOP_BY_HOP, break_off, error_of, error_response, redact
from damselfly.daemon.request import DownloadRequest
from damselfly.daemon.runtime import Failed, Finished, PieceEvent, Started
from damselfly.security.admission import Origin
from damselfly.security.policy import refusal_in

if TYPE_CHECKING:
    from dragonfly_api import common_pb2

    from damselfly.config import ProxyConfig
    from damselfly.contracts import Storage
    from damselfly.daemon.context import StartDownload, TaskUse
    from damselfly.security.policy import SourcePolicy

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)  # RFC 9110's DIGIT is ASCII
_BEYOND = 1 << 64  # a position past any size: what a longer number is worth
MAX_PRIORITY = 6  # common.v2 Priority: LEVEL0 to LEVEL6
CREDENTIAL_HEADERS = ("authorization", "cookie")  # what makes a pull "with credentials"


@dataclass(frozen=True)
class ProxyContext:
    """What the proxy needs of the daemon: its storage, downloads, and the schedulers' view of a task."""

    storage: Storage
    start_download: StartDownload
    touch: TaskUse
    stat_remote: Callable[[str], Awaitable[common_pb2.Task | None]]


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as (start, length) within ``size``; None if unsatisfiable."""
    m = _RANGE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        raise InvalidArgument(f"unsupported Range {value!r} (one bytes=a-b range is)")
    first, last = m.group(1), m.group(2)
    if not first:
        n = _position(last)
        if n == 0 or size == 0:  # a suffix of an empty representation is unsatisfiable (RFC 9110 14.1.2)
            return None
        start = max(size - n, 0)
        return start, size - start
    start = _position(first)
    end = min(_position(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end - start + 1


def header_number(headers: Any, name: str, most: int) -> int:
    """An ``X-Dragonfly-*`` number: ASCII digits, at most ``most``; 0 when absent or empty.

    ``int`` alone would take "-1", "1_000" and "٣" and let a number the protobuf cannot hold
    through (a ValueError later, answered 502 instead of 400).
    """
    value = headers.get(name, "").strip()
    if not value:
        return 0
    if not (value.isascii() and value.isdigit()) or len(value) > 20 or int(value) > most:
        raise InvalidArgument(f"bad {name} header {value[:32]!r}: a number from 0 to {most} is")
    return int(value)


def _position(digits: str) -> int:
    """A Range position; one of more than 20 digits counts as past any size (``int`` refuses 4,300)."""
    digits = digits.lstrip("0")
    return _BEYOND if len(digits) > 20 else int(digits or "0")


class SwarmResponder:
    """Answers the proxy's GETs that go through the swarm; ``session`` is the proxy's own
    (policy-checked) client session, for the registry's credential checks and content lengths."""

    def __init__(self, ctx: ProxyContext, config: ProxyConfig, policy: SourcePolicy, session: aiohttp.ClientSession):
        self.ctx = ctx
        self.cfg = config
        self.policy = policy
        self.session = session
        self._allowed: dict[tuple[str, str, str], float] = {}  # (registry, repo, credentials) -> until

    async def authorized(
        self, request: web.BaseRequest, url: str, blob: ids.BlobPath | None
    ) -> web.StreamResponse | None:
        """None when the client may have this registry blob; else the registry's refusal, to relay.

        The registry asked is the one in ``url``: the one a credentialed blob's task is bound to.
        """
        if blob is None:
            return None
        registry = urlsplit(url).netloc.lower()
        credentials = credentials_of(request.headers)
        key = (registry, blob.repository, hashlib.sha256(repr(credentials).encode()).hexdigest())
        if self._allowed.get(key, 0) > time.monotonic():
            return None
        try:
            async with self.session.head(
                url, headers=credentials, allow_redirects=True, max_redirects=self.policy.max_redirects
            ) as r:
                if r.status < 400:
                    self._allowed[key] = time.monotonic() + self.cfg.auth_cache_ttl
                    return None
                refusal = web.Response(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        refusal.headers.add(k, v)
                refusal.headers["X-Dragonfly-Error-Type"] = "backend"
                return refusal
        except (aiohttp.ClientError, PermissionDenied) as exc:
            if denied := refusal_in(exc):
                return error_of(denied)
            return error_response(502, f"cannot check access to {redact(url)}: {exc}", "backend")

    def download_request(self, request: web.BaseRequest, url: str, blob: ids.BlobPath | None) -> DownloadRequest:
        h = request.headers
        piece_length = header_number(h, "X-Dragonfly-Piece-Length", MAX_PIECE_LENGTH)
        priority = header_number(h, "X-Dragonfly-Priority", MAX_PRIORITY)
        filtered = [p.strip() for p in h.get("X-Dragonfly-Filtered-Query-Params", "").split(",") if p.strip()]
        forwarded: dict[str, str] = {}
        for k, v in h.items():
            if k.lower() in HOP_BY_HOP or k.lower().startswith("x-dragonfly-") or k.lower() == "range":
                continue
            forwarded[k] = f"{forwarded[k]}, {v}" if k in forwarded else v
        req = DownloadRequest(
            url=url,
            tag=h.get("X-Dragonfly-Tag", ""),
            application=h.get("X-Dragonfly-Application", ""),
            priority=priority,
            filtered_query_params=filtered,
            request_header=forwarded,  # the client's credentials with it, for this download only
            piece_length=piece_length,
            use_blob_digest=blob is not None,  # only a path parse_blob_path accepts is a blob task
        )
        if blob is not None and credentials_of(h):
            # A pull with credentials: its blob is a task of (registry, repository, digest), so
            # it is found only by a pull that registry authorised for that repository (the
            # check above asks the registry in this URL). An anonymous pull keeps Dragonfly's
            # digest-only id, shared with upstream peers and across registries: a registry
            # gave the blob to a client without credentials, so its bytes are public, and a
            # task only anonymous pulls fill holds nothing else. A registry that answers yes to
            # everything reaches that public task only, never a credentialed pull's.
            req.content_for_calculating_task_id = ids.bound_blob_content(*urlsplit(url)[:2], blob)
        return req

    async def respond(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        """The answer to a GET of ``url`` from the swarm: the registry's refusal, or the content
        (or its ``Range``) streamed piece by piece as the download lands them."""
        blob = ids.parse_blob_url(url)  # the one parser: credential check and task id alike
        refusal = await self.authorized(request, url, blob)
        if refusal is not None:
            return refusal
        req = self.download_request(request, url, blob)
        range_header = request.headers.get("Range", "")
        task = self.ctx.storage.get(req.task_id())
        finished_before = task is not None and task.state is TaskState.SUCCEEDED
        if range_header:
            size = await self._content_length(req, task)
            wanted = parse_range(range_header, size)
            if wanted is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            req.range = wanted
        # a whole blob is hashed as it is sent (a range cannot be checked against the digest)
        check = _BlobCheck(blob) if blob is not None and req.range is None else None
        rt = await self.ctx.start_download(req, origin=Origin.PROXY)
        self.ctx.touch(rt.task_id)
        resp: web.StreamResponse | None = None
        start, end = 0, -1
        layout: Layout | None = None
        landed: set[int] = set()
        next_number = 0
        async for event in rt.follow():
            if isinstance(event, Started):
                size = event.content_length
                start, length = req.range if req.range is not None else (0, size)
                end = start + length
                layout = Layout(size, event.piece_length)
                numbers = layout.numbers_for_range(start, length) if length else range(0)
                next_number = numbers.start if numbers else 0
                resp = web.StreamResponse(status=206 if req.range is not None else 200)
                resp.content_length = length
                resp.headers["Content-Type"] = "application/octet-stream"
                resp.headers["Accept-Ranges"] = "bytes"
                if req.range is not None:
                    resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
                if blob is not None:
                    resp.headers["Docker-Content-Digest"] = blob.digest
                resp.headers["X-Dragonfly-Task-ID"] = rt.task_id
                resp.headers["X-Dragonfly-Task-Download-Finished"] = "true" if finished_before else "false"
                await resp.prepare(request)
            elif isinstance(event, PieceEvent):
                landed.add(event.record.number)
                assert resp is not None
                assert layout is not None
                while next_number in landed:
                    span = layout.span(next_number)
                    lo, hi = max(span.offset, start), min(span.end, end)
                    if lo < hi:
                        if check is not None:  # hashed before it is sent: a bad last piece never leaves
                            await self._hash_piece(request, url, rt.task_id, next_number, check)
                            if hi == end and not check.matches():
                                break_off(request, check.mismatch(redact(url), rt.task_id))
                        part = range(lo - span.offset, hi - span.offset)
                        await self._send_piece(request, resp, url, rt.task_id, next_number, part)
                    next_number += 1
            elif isinstance(event, Finished):
                if check is not None and not check.matches():  # an empty blob, or pieces never sent
                    why = check.mismatch(redact(url), rt.task_id)
                    if resp is not None:
                        break_off(request, why)
                    logger.error("proxy: {}", why)
                    return error_response(502, why, "backend")
                if resp is None:  # an empty range or content: headers only
                    return web.Response(status=200, headers={"X-Dragonfly-Task-ID": rt.task_id})
                await resp.write_eof()
                return resp
            elif isinstance(event, Failed):
                if resp is not None and resp.prepared:  # the client sees a cut body and retries
                    break_off(request, f"{redact(url)} failed mid-response: {event.error}")
                return error_of(event.error)
        raise ConnectionResetError("download ended without a result")

    async def _hash_piece(
        self, request: web.BaseRequest, url: str, task_id: str, number: int, check: _BlobCheck
    ) -> None:
        task = self.ctx.storage.get(task_id)
        try:
            if task is None:
                raise StorageError(f"task {task_id[:12]} is gone from storage")
            span = task.layout.span(number)
            async for chunk in self.ctx.storage.read_range(task_id, span.offset, span.length):
                check.update(chunk)
        except (DamselflyError, OSError) as exc:  # deleted under us (a failed digest check, GC)
            break_off(request, f"{redact(url)}: cannot read piece {number} of task {task_id[:12]}: {exc}")

    async def _send_piece(
        self, request: web.BaseRequest, resp: web.StreamResponse, url: str, task_id: str, number: int, span: range
    ) -> None:
        """Bytes ``span`` of piece ``number``; a piece that cannot be read breaks the response off."""
        try:
            await self._write_piece(request, resp, task_id, number, span.start, len(span))
        except ConnectionError:
            raise  # the client went away
        except (DamselflyError, OSError) as exc:  # deleted under us (a failed digest check, GC)
            break_off(request, f"{redact(url)}: cannot send piece {number} of task {task_id[:12]}: {exc}")

    async def _write_piece(
        self, request: web.BaseRequest, resp: web.StreamResponse, task_id: str, number: int, skip: int, length: int
    ) -> None:
        """``length`` bytes of piece ``number`` from ``skip`` on: sendfile(2) when the storage keeps it in a file.

        This is what aiohttp's own FileResponse does: the headers are already queued on the
        transport, and ``loop.sendfile`` waits for them to be written before it starts.
        """
        region = self.ctx.storage.piece_region(task_id, number)
        transport = request.transport
        if region is not None and transport is not None and not transport.is_closing():
            try:
                with open(region.path, "rb") as f:
                    await asyncio.get_running_loop().sendfile(transport, f, region.offset + skip, length)
                return
            except NotImplementedError:
                pass  # a transport without sendfile (TLS): the plain path below
        task = self.ctx.storage.get(task_id)
        if task is None:
            raise StorageError(f"task {task_id[:12]} is gone from storage")
        offset = task.layout.span(number).offset + skip
        async for chunk in self.ctx.storage.read_range(task_id, offset, length):
            await resp.write(chunk)

    async def _content_length(self, req: DownloadRequest, task: Any) -> int:
        if task is not None and task.known_length:
            return int(task.content_length)
        remote = await self.ctx.stat_remote(req.task_id())
        if remote is not None and remote.content_length > 0:
            return int(remote.content_length)
        return await self._stat(req.url, req.request_header)

    async def _stat(self, url: str, headers: dict[str, str]) -> int:
        """The upstream's content length, asked through the proxy's own (policy-checked) session:
        a HEAD, else the first byte's ``Content-Range``."""
        try:
            async with self.session.head(
                url, headers=headers, allow_redirects=True, max_redirects=self.policy.max_redirects
            ) as r:
                if r.status < 400 and r.content_length is not None:
                    return int(r.content_length)
                if r.status >= 400 and r.status not in (405, 501):
                    raise BackendError(f"origin answered {r.status} for HEAD {redact(url)}", status_code=r.status)
            async with self.session.get(
                url, headers={**headers, "Range": "bytes=0-0"}, max_redirects=self.policy.max_redirects
            ) as r:
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if r.status == 206 and total.isdigit():
                    return int(total)
                if r.status == 200 and r.content_length is not None:
                    return int(r.content_length)
        except (aiohttp.ClientError, PermissionDenied) as exc:
            if denied := refusal_in(exc):
                raise denied from None
            raise BackendError(f"cannot reach origin for {redact(url)}: {exc}") from None
        raise BackendError(f"origin gives no content length for {redact(url)}")


def credentials_of(headers: Any) -> list[tuple[str, str]]:
    """The client's ``Authorization`` and ``Cookie`` headers: they decide whose pull it is."""
    return [(k, v) for k, v in headers.items() if k.lower() in CREDENTIAL_HEADERS]


class _BlobCheck:
    """The digest of a whole blob, as its bytes are sent."""

    def __init__(self, blob: ids.BlobPath):
        self.blob = blob
        self.hash = hashlib.new(blob.algorithm)
        self.sent = 0

    def update(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.sent += len(chunk)

    def matches(self) -> bool:
        return hmac.compare_digest(self.hash.hexdigest(), self.blob.hex)

    def mismatch(self, url: str, task_id: str) -> str:
        got = f"{self.blob.algorithm}:{self.hash.hexdigest()}"
        return f"blob {url} (task {task_id[:12]}) is {got} after {self.sent} bytes, not {self.blob.digest}"
