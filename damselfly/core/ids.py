"""Identifiers computed exactly as Dragonfly v2 computes them.

Task ids are what lets a damselfly peer and a Dragonfly peer agree that they are
fetching the same thing, so every rule here is checked against the upstream
client's vectors in ``tests/core/test_ids.py``.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from damselfly.core.errors import InvalidArgument

SEED_SUFFIX = "seed"
STANDARD_TASK_TYPE = "STANDARD"

# Query parameters that carry signatures or request-specific noise: two URLs that
# differ only in these name the same content (S3, GCS, OSS, OBS, COS, containerd).
DEFAULT_FILTERED_QUERY_PARAMS: tuple[str, ...] = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-User-Agent",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "OSSAccessKeyId",
    "Expires",
    "Signature",
    "security-token",
    "x-oss-signature-version",
    "x-oss-credential",
    "x-oss-date",
    "x-oss-expires",
    "x-oss-signature",
    "x-oss-additional-headers",
    "AccessKeyId",
    "x-obs-security-token",
    "q-sign-algorithm",
    "q-ak",
    "q-sign-time",
    "q-key-time",
    "q-header-list",
    "q-url-param-list",
    "q-signature",
    "x-cos-security-token",
    "ns",
)

# The OCI distribution spec's repository name: lowercase alphanumeric components joined by one
# separator (".", "_", "__" or a run of "-"), components separated by "/".
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_BLOB_PATH = re.compile(  # matched whole (fullmatch: "$" would let a trailing newline through)
    rf"/v2/(?P<name>{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*)/blobs/(?P<digest>sha256:[0-9a-f]{{64}}|sha512:[0-9a-f]{{128}})"
)
_MANIFEST_DIGEST = re.compile(r"/manifests/(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})(?:[?#]|$)")


def _query_escape(value: str) -> str:
    """Escape like Go's ``url.QueryEscape`` (space as ``+``, ``~`` kept)."""
    return quote_plus(value, safe="~")


def filter_query_params(url: str, filtered: list[str] | tuple[str, ...]) -> str:
    """Drop the named query parameters and sort the rest by key.

    With nothing to filter the URL is returned untouched, as upstream does. Values
    of a repeated key keep their order; segments holding ``;`` are dropped.
    """
    if not filtered:
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(f"invalid url {url!r}: {exc}") from None
    if not parts.scheme or not (parts.netloc or parts.scheme.lower() == "file"):
        raise InvalidArgument(f"invalid url {url!r}: scheme and host are required")
    drop = set(filtered)
    pairs: list[tuple[str, str]] = []
    for segment in parts.query.split("&") if parts.query else []:
        if ";" in segment:
            continue
        pairs.extend((k, v) for k, v in parse_qsl(segment, keep_blank_values=True) if k not in drop)
    pairs.sort(key=lambda kv: kv[0])
    query = "&".join(f"{_query_escape(k)}={_query_escape(v)}" for k, v in pairs)
    path = parts.path or "/"
    out = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, query, parts.fragment))
    if path == "/" and not query and not parts.fragment and out.endswith("/"):
        out = out[:-1]
    return out


def task_id(
    url: str,
    *,
    tag: str | None = None,
    application: str | None = None,
    revision: str | None = None,
    piece_length: int | None = None,
    filtered_query_params: list[str] | tuple[str, ...] = (),
) -> str:
    """The URL-based task id of a standard task."""
    h = hashlib.sha256(filter_query_params(url, filtered_query_params).encode())
    for field in (tag, application, revision):
        if field:
            h.update(field.encode())
    if piece_length:
        h.update(str(piece_length).encode())
    h.update(STANDARD_TASK_TYPE.encode())
    return h.hexdigest()


def content_task_id(content: str) -> str:
    """Upstream Dragonfly's task id from ``content_for_calculating_task_id``: sha256 of the content.

    damselfly does not name tasks with it (``keyed_task_id`` does): it is the hash space of URL
    ids, so a client could pick the content whose sha256 is a victim URL's task id and fill that
    task with another URL's bytes. Kept, checked against upstream's vector, for comparison only;
    a content-keyed damselfly task is therefore not the same task as an upstream peer's."""
    return hashlib.sha256(content.encode()).hexdigest()


# No URL's filtered form (``scheme:...``) nor any other id's hash input starts with it.
KEYED_TASK_PREFIX = b"damselfly-task-key\x00"


def keyed_task_id(content: str) -> str:
    """The task id of a request keyed by ``content_for_calculating_task_id``: sha256 of a prefix
    no URL can begin with, then the content, so that no key names a URL's task (a deviation
    from upstream, which hashes the content alone: ``content_task_id``)."""
    return hashlib.sha256(KEYED_TASK_PREFIX + content.encode()).hexdigest()


def endpoint_task_id(base_id: str, endpoint: str) -> str:
    """The task id of a request that overrides its source's endpoint (``endpoint``, canonical):
    its own task, never the one the same URL names from the configured endpoint."""
    return hashlib.sha256(f"{base_id}\x00endpoint\x00{endpoint}".encode()).hexdigest()


# Persistent cache tasks (``damselfly cache import``): their content lives only in the swarm,
# under ``damselfly-cache://SHA256[?tag=..&application=..]``; the url is the task's own key.
CACHE_SCHEME = "damselfly-cache"
CACHE_URL_PREFIX = f"{CACHE_SCHEME}://"


def cache_url(sha256_hex: str, tag: str = "", application: str = "") -> str:
    """The url of the persistent cache task holding the content whose sha256 is ``sha256_hex``."""
    query = urlencode({k: v for k, v in (("tag", tag), ("application", application)) if v})
    return f"{CACHE_URL_PREFIX}{sha256_hex}" + (f"?{query}" if query else "")


def cache_task_id(url: str) -> str:
    """The task id of a cache url: its own task key (``content_for_calculating_task_id``)."""
    return keyed_task_id(url)


def cache_url_digest(url: str) -> str | None:
    """The ``sha256:hex`` a cache url names its content by; None for any other url."""
    if not url.startswith(CACHE_URL_PREFIX):
        return None
    sha = url[len(CACHE_URL_PREFIX) :].partition("?")[0]
    return f"sha256:{sha}" if len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) else None


@dataclass(frozen=True)
class BlobPath:
    """A registry blob path, ``/v2/<name>/blobs/<algorithm>:<hex>``, taken apart."""

    repository: str
    digest: str  # algorithm:hex

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def parse_blob_path(path: str) -> BlobPath | None:
    """The one parser of registry blob paths: the whole path must be ``/v2/<name>/blobs/<digest>``.

    Anchored at both ends, with the OCI name grammar and a sha256 or sha512 digest, so that
    ``/x/blobs/sha256:...`` or ``/v2/a/blobs/sha256:.../more`` is no blob. The proxy's
    credential check and the blob task id both use it: a path that is not checked as a
    blob never gets a blob's task id either. (Upstream Dragonfly looks for ``blobs/<digest>``
    anywhere in the URL; every URL a registry client sends passes both.)
    """
    m = _BLOB_PATH.fullmatch(path)
    return BlobPath(m["name"], m["digest"]) if m else None


def parse_blob_url(url: str) -> BlobPath | None:
    """``parse_blob_path`` of a URL's path (its query, e.g. containerd's ``ns=``, aside)."""
    try:
        return parse_blob_path(urlsplit(url).path)
    except ValueError:
        return None


def blob_digest(url: str) -> str | None:
    """The ``algo:hex`` digest of an OCI blob URL, or None when it is not one (see ``parse_blob_path``)."""
    blob = parse_blob_url(url)
    return blob.digest if blob else None


BOUND_BLOB_PREFIX = "oci-blob"  # every key that starts with it is a bound blob's (admission reserves them)


def bound_blob_content(scheme: str, registry: str, blob: BlobPath) -> str:
    """``content_for_calculating_task_id`` of a blob pulled with credentials: bound to its registry
    (``scheme`` and ``host[:port]``) and repository, so that its task is found only by a pull the
    same registry authorised for the same repository over the same scheme (a plaintext pull never
    shares a task authorised over https), never by a digest alone."""
    return f"{BOUND_BLOB_PREFIX}+{scheme.lower()}://{registry.lower()}/{blob.repository}@{blob.digest}"


def is_bound_blob_content(content: str) -> bool:
    """``content`` has the form of a bound blob's key (any ``oci-blob...`` key, old forms too)."""
    return content[: len(BOUND_BLOB_PREFIX)].lower() == BOUND_BLOB_PREFIX


def blob_task_id(url: str) -> str:
    """Blob-digest mode: the digest's hex is the task id, whatever registry serves it."""
    digest = blob_digest(url)
    if digest is None:
        raise InvalidArgument(f"not an OCI blob url with a sha256/sha512 digest: {url!r}")
    return digest.split(":", 1)[1]


def manifest_task_id(url: str) -> str:
    m = _MANIFEST_DIGEST.search(url)
    if m is None:
        raise InvalidArgument(f"not an OCI manifest url with a digest: {url!r}")
    return m.group(1).split(":", 1)[1]


def host_id(ip: str, hostname: str, *, seed: bool = False) -> str:
    return f"{ip}-{hostname}-{SEED_SUFFIX}" if seed else f"{ip}-{hostname}"


def peer_id(ip: str, hostname: str, *, seed: bool = False, nonce: uuid.UUID | None = None) -> str:
    base = f"{ip}-{hostname}-{nonce or uuid.uuid4()}"
    return f"{base}-{SEED_SUFFIX}" if seed else base


_TASK_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")  # matched whole: "$" would let a trailing newline through


def is_task_id(value: str) -> bool:
    return _TASK_ID.fullmatch(value) is not None
