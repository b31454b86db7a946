"""Conversions between damselfly's core objects and Dragonfly's protobuf messages."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from dragonfly_api import common_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from damselfly.core import ids
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer
from damselfly.core.task import PieceRecord, Task

ERROR_TYPE_KEY = "x-dragonfly-error-type"
"""gRPC trailing metadata naming whose fault a failure is: backend, proxy or dfdaemon."""


def set_time(ts: timestamp_pb2.Timestamp, t: float) -> None:
    """Set a Timestamp field in place (cheaper than building one and copying it in)."""
    ts.seconds, ts.nanos = divmod(int(t * 1e9), 1_000_000_000)


def timestamp(t: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    set_time(ts, time.time() if t is None else t)
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


# -- credentials ------------------------------------------------------------------------
#
# A request's credentials travel with that request only: the scheduler strips them from
# every Download it keeps (the task, StatTask, answers to other peers, logs). The one
# exception is the seed trigger, which hands the requester's own request to the chosen
# seed over mutual TLS, without keeping it.

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
SECRET_HEADER_PREFIXES = ("x-amz-",)
# the credential fields of a Download's per-source messages (a credential file's path too:
# it names a file on the requester's node): every message of the protocol, whether or not a
# source of ours reads it. Those that one does are described with its options
# (plugins/source/options.py), which rpc cannot import; tests/plugins/source/test_options.py
# checks that the two agree.
SOURCE_SECRETS: dict[str, tuple[str, ...]] = {
    "object_storage": ("access_key_id", "access_key_secret", "session_token", "security_token", "credential_path"),
    "hdfs": ("delegation_token",),
    "hugging_face": ("token",),
    "model_scope": ("token",),
    "open_csg": ("token",),
}
# query parameters of signed URLs that are credentials (their values are redacted in what is shown)
SECRET_QUERY_PARAMS = frozenset(
    p.lower()
    for p in (
        "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Security-Token", "X-Goog-Credential", "X-Goog-Signature",
        "OSSAccessKeyId", "Signature", "security-token", "x-oss-credential", "x-oss-signature", "AccessKeyId",
        "x-obs-security-token", "q-ak", "q-signature", "x-cos-security-token", "sig", "token", "access_token",
    )
)  # fmt: skip
REDACTED = "REDACTED"


# The request headers the scheduler may keep and show (an allow-list): those that say which
# content or representation is asked for, and Dragonfly's own (X-Dragonfly-*) except any whose
# name says it carries a credential. Every other header may be one (X-Auth-Token, PRIVATE-TOKEN,
# X-Api-Key, a vendor's signature...): it stays on the peer's stream and goes only to the seed
# chosen for it, over TLS.
PUBLIC_HEADERS = frozenset(
    h.lower()
    for h in (
        "Range", "Accept", "Accept-Encoding", "Accept-Language", "Accept-Charset", "User-Agent", "Content-Type",
        "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Cache-Control",
        "Pragma", "Origin", "Host", "DNT", "Docker-Distribution-API-Version", "Connection", "Keep-Alive", "TE",
        "Upgrade-Insecure-Requests", "Via",
    )
)  # fmt: skip
PUBLIC_HEADER_PREFIXES = ("x-dragonfly-",)
_CREDENTIAL_NAME = re.compile(r"auth|token|secret|passw|cookie|credential|signature|session|api-?key|private|key$")


def is_secret_header(name: str) -> bool:
    """``name`` is not a header the scheduler may keep: anything outside the allow-list."""
    n = name.strip().lower()
    if n in SECRET_HEADERS or n.startswith(SECRET_HEADER_PREFIXES):
        return True
    if n in PUBLIC_HEADERS:
        return False
    return not (n.startswith(PUBLIC_HEADER_PREFIXES) and not _CREDENTIAL_NAME.search(n))


def public_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` the scheduler may keep and show: only the allow-listed ones (``PUBLIC_HEADERS``,
    X-Dragonfly-* that carry no credential); every other header counts as a secret."""
    return {k: v for k, v in headers.items() if not is_secret_header(k)}


def has_secrets(download: common_pb2.Download) -> bool:
    """``download`` carries a credential: a secret header or a source's token or key."""
    if any(is_secret_header(k) for k in download.request_header):
        return True
    for message, fields in SOURCE_SECRETS.items():
        if download.HasField(message):
            sub = getattr(download, message)
            if any(getattr(sub, f) for f in fields):
                return True
    return False


def strip_secrets(download: common_pb2.Download) -> common_pb2.Download:
    """``download`` as the scheduler may keep and show it: without secret headers and without
    the sources' tokens and keys. The message itself when it holds none (no copy), a copy
    otherwise: the caller's request keeps its credentials."""
    if not has_secrets(download):
        return download
    out = common_pb2.Download()
    out.CopyFrom(download)
    for k in [k for k in out.request_header if is_secret_header(k)]:
        del out.request_header[k]
    for message, fields in SOURCE_SECRETS.items():
        if out.HasField(message):
            sub = getattr(out, message)
            for f in fields:
                sub.ClearField(f)
    return out


def redact_url(url: str) -> str:
    """``url`` as it may be shown: without user:password and with the values of signed URLs'
    credential parameters replaced (the URL itself when there is nothing to hide)."""
    if "@" not in url and "?" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_PARAMS for k, _ in pairs):
            query = urlencode([(k, REDACTED if k.lower() in SECRET_QUERY_PARAMS else v) for k, v in pairs])
    if netloc == parts.netloc and query == parts.query:
        return url
    return SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment).geturl()


# -- task ids -----------------------------------------------------------------------------
#
# A task id is a function of the request, never the requester's word: the daemon computes a
# download's id with ``task_id_of`` (``DownloadRequest.task_id``) and the scheduler refuses a
# register whose task id is not its Download's (``download_task_id``), so a peer cannot put
# one URL's content under another URL's task.


def task_id_of(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    revision: str = "",
    piece_length: int = 0,
    filtered_query_params: list[str] | tuple[str, ...] = (),
    content: str = "",
    blob_digest_mode: bool = False,
    endpoint: str = "",
) -> str:
    """The task id of a download: ``ids.keyed_task_id`` of ``content``
    (``content_for_calculating_task_id``) when there is one; the blob digest's hex in blob-digest
    mode for an OCI blob URL; else the URL-based id (query filtered with ``filtered_query_params``,
    Dragonfly's list when empty). A request that names its source's endpoint (``endpoint``,
    ``source_endpoint``) gets that id folded with it: what another server answers for the same
    URL is another task. InvalidArgument for a URL without scheme and host."""
    if content:
        base = ids.keyed_task_id(content)
    elif blob_digest_mode and ids.blob_digest(url):
        base = ids.blob_task_id(url)
    else:
        base = ids.task_id(
            url,
            tag=tag or None,
            application=application or None,
            revision=revision or None,
            piece_length=piece_length or None,
            filtered_query_params=filtered_query_params or ids.DEFAULT_FILTERED_QUERY_PARAMS,
        )
    return ids.endpoint_task_id(base, endpoint) if endpoint else base


# The Download fields that name the server a source talks to (or how it is trusted): the ones
# of the sources' ``endpoint_fields`` that a Download carries (HDFS names its namenode in the url).
ENDPOINT_FIELDS: dict[str, tuple[str, ...]] = {
    "object_storage": ("endpoint", "insecure_skip_verify"),
    "hugging_face": ("base_url",),
}


def source_endpoint(options: Mapping[str, Mapping[str, Any]]) -> str:
    """The canonical endpoint override of a request's source options (the Download's
    object_storage / hugging_face messages as dicts), '' when it names none."""
    named = [
        f"{name}.{key}={json.dumps(value)}"
        for name, keys in ENDPOINT_FIELDS.items()
        for key in keys
        if (value := (options.get(name) or {}).get(key))
    ]
    return "\n".join(named)


def download_task_id(download: common_pb2.Download) -> str:
    """The task id of a Dragonfly ``Download``, as the daemon that acts on it computes it."""
    return task_id_of(
        download.url,
        tag=download.tag,
        application=download.application,
        revision=download.hugging_face.revision,  # '' when the message is absent (it stays absent)
        piece_length=download.piece_length,
        filtered_query_params=download.filtered_query_params,
        content=download.content_for_calculating_task_id,
        blob_digest_mode=download.enable_task_id_based_blob_digest,
        endpoint=source_endpoint(
            {
                name: {key: getattr(getattr(download, name), key) for key in keys}
                for name, keys in ENDPOINT_FIELDS.items()
            }
        ),
    )


# -- piece digests ------------------------------------------------------------------------

PIECE_DIGEST = re.compile(r"crc32:[0-9]{1,10}|sha256:[0-9a-f]{64}|blake3:[0-9a-f]{64}")


def valid_piece_digest(value: str) -> bool:
    """``value`` is a piece digest of the contract: ``crc32:N``, ``sha256:HEX`` or ``blake3:HEX``."""
    return PIECE_DIGEST.fullmatch(value) is not None


def host_from_proto(pb: common_pb2.Host, now: float) -> Host:
    return Host(
        id=pb.id,
        ip=pb.ip,
        hostname=pb.hostname,
        port=pb.port,
        type=HostType(pb.type) if pb.type in HostType._value2member_map_ else HostType.NORMAL,
        download_port=pb.download_port,
        proxy_port=pb.proxy_port,
        # interned: a decision compares every candidate's with the child's, by identity first
        idc=sys.intern(pb.network.idc),
        location=sys.intern(pb.network.location),
        max_tx_bandwidth=pb.network.max_tx_bandwidth,
        tx_bandwidth=pb.network.tx_bandwidth,
        disable_shared=pb.disable_shared,
        announced_at=now,
    )


def host_to_proto(h: Host) -> common_pb2.Host:
    return common_pb2.Host(
        id=h.id,
        type=int(h.type),
        hostname=h.hostname,
        ip=h.ip,
        port=h.port,
        download_port=h.download_port,
        proxy_port=h.proxy_port,
        disable_shared=h.disable_shared,
        network=common_pb2.Network(
            idc=h.idc, location=h.location, max_tx_bandwidth=h.max_tx_bandwidth, tx_bandwidth=h.tx_bandwidth
        ),
    )


def piece_to_proto(
    p: PieceRecord, traffic_type: int = 0, parent_id: str = "", cost: float = 0.0, created_at: float | None = None
) -> common_pb2.Piece:
    return common_pb2.Piece(
        number=p.number,
        parent_id=parent_id,
        offset=p.offset,
        length=p.length,
        digest=p.digest,
        traffic_type=traffic_type,
        cost=duration(cost),
        created_at=timestamp(created_at),
    )


def piece_from_proto(pb: common_pb2.Piece) -> PieceRecord:
    return PieceRecord(pb.number, pb.offset, pb.length, pb.digest)


def task_to_proto(t: Task, *, with_pieces: bool = True) -> common_pb2.Task:
    size_scope = common_pb2.EMPTY if t.content_length == 0 else common_pb2.NORMAL
    pb = common_pb2.Task(
        id=t.id,
        type=common_pb2.TaskType.STANDARD,
        url=t.url,
        digest=t.digest,
        tag=t.tag,
        application=t.application,
        filtered_query_params=t.filtered_query_params,
        request_header=t.request_header,
        content_length=max(t.content_length, 0),
        piece_count=t.piece_count,
        size_scope=size_scope,
        state=t.state.value,
        peer_count=len(t.peer_ids),
        created_at=timestamp(t.created_at),
        updated_at=timestamp(t.updated_at),
    )
    if with_pieces:
        pb.pieces.extend(piece_to_proto(p) for p in sorted(t.pieces.values(), key=lambda p: p.number))
    return pb


def fill_peer_proto(
    pb: common_pb2.Peer, p: Peer, host_pb: common_pb2.Host, task_pb: common_pb2.Task
) -> common_pb2.Peer:
    """Fill an empty Peer message in place (``parents.add()`` of an answer, say): no nested
    message is built and then copied."""
    _fill_peer_own(pb, p)
    pb.task.CopyFrom(task_pb)
    pb.host.CopyFrom(host_pb)
    return pb


def _fill_peer_own(pb: common_pb2.Peer, p: Peer) -> None:
    """The fields of a Peer message that are the peer's own (not its task's or host's)."""
    pb.id, pb.priority, pb.state, pb.need_back_to_source = p.id, p.priority, p.state.value, p.need_back_to_source
    set_time(pb.created_at, p.created_at)
    set_time(pb.updated_at, p.updated_at)


def varint(n: int) -> bytes:
    """``n`` (not negative) as a protobuf varint."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (a message, string or bytes) in protobuf's wire format.
    Encodings of one message concatenated parse as one message (a message field that
    appears twice is merged), so answers can be assembled from cached parts."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def peer_own_bytes(p: Peer) -> bytes:
    """The encoding of a Peer message with ``p``'s own fields, as :func:`fill_peer_proto`
    sets them, but no task and no host (which callers append, each encoded once)."""
    pb = common_pb2.Peer()
    _fill_peer_own(pb, p)
    return pb.SerializeToString()


PEER_TASK, PEER_HOST = 7, 8  # common.v2.Peer's field numbers


def peer_to_proto(p: Peer, host: Host, task: Task, task_pb: common_pb2.Task | None = None) -> common_pb2.Peer:
    return fill_peer_proto(
        common_pb2.Peer(), p, host_to_proto(host), task_pb if task_pb is not None else task_to_proto(task)
    )


# -- transport negotiation ------------------------------------------------------------
#
# A parent names the transports it serves, with their addresses, in the initial
# metadata of its SyncPieces answer (JSON under ``x-damselfly-transports``).
# SyncPiecesResponse's own ``tcp_port``/``quic_port`` are still filled, and are what a
# child falls back on when the parent (an upstream dfdaemon, say) sends no list.

TRANSPORTS_KEY = "x-damselfly-transports"


def transports_to_metadata(addresses: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return ((TRANSPORTS_KEY, json.dumps(addresses, separators=(",", ":"))),)


def transports_from_metadata(metadata: Any) -> dict[str, str]:
    for key, value in metadata or ():
        if key == TRANSPORTS_KEY:
            try:
                parsed = json.loads(value)
            except ValueError:
                return {}
            if isinstance(parsed, dict):
                return {str(k): str(v) for k, v in parsed.items() if isinstance(v, str)}
    return {}


def addresses_from_response(resp: Any) -> dict[str, str]:
    found = {"tcp": f"{resp.ip}:{resp.tcp_port}"} if resp.tcp_port else {}
    if resp.quic_port:
        found["quic"] = f"{resp.ip}:{resp.quic_port}"
    return found


# -- shared source reads --------------------------------------------------------------
#
# A damselfly daemon that may read the source says so in the metadata of its AnnouncePeer
# call (``x-damselfly-source-shares: 1``). To such a peer a scheduler with
# ``scheduler.source_shares`` may hand pieces to read from the source itself: a candidate
# parent whose id starts with SOURCE_SHARE_PREFIX, with need_back_to_source set and the
# pieces listed. A client that does not say so (an upstream dfdaemon) never gets one.

SOURCE_SHARES_KEY = "x-damselfly-source-shares"
SOURCE_SHARES_METADATA = ((SOURCE_SHARES_KEY, "1"),)
# a trailer of AnnounceHost: the scheduler process's boot id (a new one: it lost what daemons told it)
BOOT_METADATA = "damselfly-scheduler-boot"
SOURCE_SHARE_PREFIX = "damselfly-source-share/"


def source_share_to_proto(
    serial: int, numbers: list[int], task: Task, task_pb: common_pb2.Task | None = None
) -> common_pb2.Peer:
    """The candidate that tells a peer to read pieces ``numbers`` from the source."""
    spans = [task.layout.span(n) for n in numbers]
    return common_pb2.Peer(
        id=f"{SOURCE_SHARE_PREFIX}{serial}",
        need_back_to_source=True,
        task=task_pb if task_pb is not None else task_to_proto(task),
        pieces=[common_pb2.Piece(number=s.number, offset=s.offset, length=s.length) for s in spans],
    )


def source_share_from_proto(pb: common_pb2.Peer) -> list[int] | None:
    """The pieces a source-share candidate hands over; None for an ordinary parent."""
    if not pb.id.startswith(SOURCE_SHARE_PREFIX):
        return None
    return sorted({p.number for p in pb.pieces})


def offers_source_shares(metadata: Any) -> bool:
    return any(key == SOURCE_SHARES_KEY and value == "1" for key, value in metadata or ())
