"""The one admission point: every download request is classified by where it came from,
and that decides which sources it may use and with whose credentials.

The rules:

- ``file://`` and every other source that reads this node's own files (``LOCAL_SCHEMES``,
  any fsspec protocol whose filesystem is local) only for a local client (the unix
  socket) or the daemon itself.
- A request from the network (the proxy, the upload API, a scheduler's seed trigger, a
  preheat) only for the schemes in ``security.sources.schemes``; the proxy's upstream only
  ``http``/``https``. ``damselfly-cache://`` tasks come from the swarm alone, never from a
  file, so cluster members may ask for them (that is how replicas are placed).
- The URL's host (where the scheme names one) against the source policy, for every
  origin, a local client's too; source plugins check again at connect time and on every
  redirect.
- A request from the network never borrows the node's configured credentials, and a
  request that overrides a source's endpoint never gets them from any origin
  (``source_options``).
- Only a local client (or a cluster member proven by its certificate) may pin a task
  against garbage collection.
- A request from the network names its task by its URL: its ``content_for_calculating_task_id``
  (whose ``ids.keyed_task_id`` is the task id, never a URL's) may only be the one its URL
  implies (``derived_task_key``), or any key's task could be filled with another URL's bytes.
  A local client keeps the freedom (dfget's ``--content-for-calculating-task-id``), except for
  a registry-bound blob key, which no local client may use (it would read a private blob
  without showing the registry credentials).

A download runs in a task started under ``admitted(origin, policy)``: the sources it makes
know whose request they serve (``current_origin()``, for their options) and the policy
their connections are checked against (``current_policy()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from damselfly.core import ids
from damselfly.core.errors import InvalidArgument, PermissionDenied
from damselfly.core.ids import CACHE_URL_PREFIX
from damselfly.security.policy import LOCAL_SCHEMES, SourcePolicy

if TYPE_CHECKING:
    from damselfly.contracts import Source


class Admissible(Protocol):
    """What admission reads of a download request (the daemon's ``DownloadRequest``, a dataclass)."""

    url: str
    content_for_calculating_task_id: str
    request_header: dict[str, str]


R = TypeVar("R", bound=Admissible)


class Origin(enum.Enum):
    """Where a download request came from."""

    LOCAL = "local"  # the daemon's unix socket: a user of this node
    PROXY = "proxy"  # a client of the node's HTTP proxy (containers, pods)
    UPLOAD = "upload"  # DfdaemonUpload.DownloadTask from another cluster member
    SCHEDULER = "scheduler"  # a seed trigger the scheduler sent over the upload API
    PREHEAT = "preheat"  # a preheat job
    INTERNAL = "internal"  # the daemon itself (cache import, re-announce)

    @property
    def from_network(self) -> bool:
        return self not in (Origin.LOCAL, Origin.INTERNAL)


# What the proxy's upstream may be, whatever else the policy allows.
PROXY_SCHEMES = frozenset({"http", "https"})
# Content that only ever comes from the swarm (no origin, no file behind it).
SWARM_SCHEMES = frozenset({ids.CACHE_SCHEME})
# Schemes whose URL names the server that is reached (s3://BUCKET, hf://OWNER/REPO do not:
# their sources check the endpoint they connect to).
HOST_SCHEMES = frozenset({"http", "https", "hdfs", "webhdfs", "oci", "ftp", "sftp", "ssh", "smb", "webdav"})
# The request header that keeps a replica of a persistent cache task until then (daemon.request).
PIN_HEADER = "x-damselfly-cache-expires"


@dataclass(frozen=True)
class Admission:
    """Whose request a running download serves, and the source policy it runs under."""

    origin: Origin
    policy: SourcePolicy
    # opens a local path for reading as the local caller (a file descriptor), where the caller is
    # not the daemon's own user: file:// sources open through it, so the kernel checks the caller
    open_local: Callable[[str], Awaitable[int]] | None = None


_CURRENT: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("damselfly_admission", default=None)


def current() -> Admission | None:
    """The admission of the download running here (None outside any admitted download)."""
    return _CURRENT.get()


def current_origin() -> Origin | None:
    """The origin of the request the running download serves (None outside any download)."""
    adm = _CURRENT.get()
    return adm.origin if adm is not None else None


def current_policy() -> SourcePolicy | None:
    """The source policy of the running download (None outside any download)."""
    adm = _CURRENT.get()
    return adm.policy if adm is not None else None


@contextlib.contextmanager
def admitted(
    origin: Origin, policy: SourcePolicy, open_local: Callable[[str], Awaitable[int]] | None = None
) -> Iterator[None]:
    """Tasks started inside this block (and the sources they make) act for ``origin``, under
    ``policy``; local files are opened through ``open_local`` when given."""
    token = _CURRENT.set(Admission(origin, policy, open_local))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def reads_this_node(scheme: str) -> bool:
    """``scheme``'s source reads this node's own files or memory."""
    scheme = scheme.lower()
    if scheme in LOCAL_SCHEMES:
        return True
    if scheme in HOST_SCHEMES | SWARM_SCHEMES | {"s3", "s3a", "hf"}:
        return False  # (not worth importing their fsspec implementations to know)
    try:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
        from fsspec.implementations.memory import MemoryFileSystem

        cls = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return False
    return issubclass(cls, LocalFileSystem | MemoryFileSystem)


def allowed_schemes(origin: Origin, policy: SourcePolicy) -> frozenset[str] | None:
    """The schemes a request from ``origin`` may use (None: any, for a local client)."""
    if not origin.from_network:
        return None
    if origin is Origin.PROXY:
        return policy.schemes & PROXY_SCHEMES
    return policy.schemes | SWARM_SCHEMES


def check_source(url: str, origin: Origin, policy: SourcePolicy) -> None:
    """May a request from ``origin`` have ``url`` fetched? PermissionDenied (one line) when not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"invalid url {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if origin.from_network and reads_this_node(scheme):
        raise PermissionDenied(
            f"{scheme}:// reads this node's own files: only a local client (the daemon's socket) may ask for it, "
            f"not a request from the {origin.value}"
        )
    schemes = allowed_schemes(origin, policy)
    if schemes is not None and scheme not in schemes:
        where = "security.sources.schemes" + (" and the proxy's http/https" if origin is Origin.PROXY else "")
        raise PermissionDenied(
            f"a request from the {origin.value} may not use {scheme}:// sources ({where}: {', '.join(sorted(schemes))})"
        )
    if scheme in HOST_SCHEMES and parts.hostname:
        policy.check_host(parts.hostname, port)


def derived_task_key(url: str) -> str | None:
    """The ``content_for_calculating_task_id`` that ``url`` itself implies, None if none: the
    url of a persistent cache task (``damselfly-cache://``: replicas and their seed triggers),
    the registry-and-repository-bound key of an OCI blob (credentialed pulls, as the proxy and
    preheat make it: ``ids.bound_blob_content``)."""
    if url.startswith(CACHE_URL_PREFIX):
        return url
    blob = ids.parse_blob_url(url)
    if blob is None:
        return None
    try:
        return ids.bound_blob_content(*urlsplit(url)[:2], blob)
    except ValueError:
        return None


def check_task_key(url: str, content: str, origin: Origin) -> None:
    """May a request from ``origin`` choose its task id with ``content``? PermissionDenied (one
    line) when it comes from the network with a content its url does not imply: else a request
    could name another request's key, with its own URL, and have that task filled with its own
    bytes. (A key never names a URL's task: ``ids.keyed_task_id``.)

    A bound blob's key (``ids.bound_blob_content``) names bytes a registry gave a client with
    credentials: it is taken only when derived from the request's own url, whatever the origin,
    and never from a local client, who shows the registry no credentials (the proxy, which asks
    the registry, and the scheduler's seed trigger and preheat make bound tasks)."""
    if ids.is_bound_blob_content(content):
        if origin is Origin.LOCAL:
            raise PermissionDenied(
                "a local client may not set content_for_calculating_task_id to a registry-bound blob key "
                "(only the proxy, which checks the client's registry credentials, makes those tasks)"
            )
        if content != derived_task_key(url):
            raise PermissionDenied(
                f"a request from the {origin.value} may set content_for_calculating_task_id to a registry-bound blob "
                "key only as its own url implies it"
            )
        return
    if not content or not origin.from_network or content == derived_task_key(url):
        return
    raise PermissionDenied(
        f"a request from the {origin.value} may not set content_for_calculating_task_id, except to the key "
        "its own url implies (a damselfly-cache:// url itself, a credentialed OCI blob's registry-bound key): "
        "its task id is its url's"
    )


def admit(req: R, origin: Origin, policy: SourcePolicy, *, member: bool = False) -> R:
    """The request as it may run for ``origin`` under ``policy``, or PermissionDenied.

    ``member``: the caller proved with its certificate that it is a cluster member (then it
    may pin a replica against garbage collection, as ``cache import --replicas`` does)."""
    check_source(req.url, origin, policy)
    check_task_key(req.url, req.content_for_calculating_task_id, origin)
    if origin.from_network and not member:
        pins = [k for k in req.request_header if k.lower() == PIN_HEADER]
        if pins:
            req = replace(req, request_header={k: v for k, v in req.request_header.items() if k not in pins})
    return req


# -- credentials -----------------------------------------------------------------------------

# Option names that hold credentials, for sources that do not declare ``credential_fields``.
_SECRET_NAME = re.compile(r"token|secret|password|passwd|credential|auth|(^|_)key($|_)|sas|connection_string", re.I)


def credential_fields(source: type[Source]) -> frozenset[str]:
    """The options of ``source`` that are credentials: declared, else guessed from their names."""
    declared = getattr(source, "credential_fields", None)
    if declared is not None:
        return frozenset(declared)
    fields = getattr(source.Config, "model_fields", {})
    return frozenset(name for name in fields if _SECRET_NAME.search(name))


def endpoint_fields(source: type[Source]) -> frozenset[str]:
    """The options of ``source`` that say which server it talks to."""
    return frozenset(getattr(source, "endpoint_fields", ()))


def _without_secrets(options: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k in secrets or (_SECRET_NAME.search(k) and not isinstance(v, Mapping)):
            continue
        out[k] = _without_secrets(v, secrets) if isinstance(v, Mapping) else v
    return out


def source_options(
    source: type[Source],
    configured: Mapping[str, Any],
    request: Mapping[str, Mapping[str, Any]] | None,
    origin: Origin | None,
) -> dict[str, Any]:
    """The options ``source`` is built with: the configured ones (``sources.NAME``), then
    the request's own (its ``request_field`` message).

    The configured credentials are left out when the request came from the network
    (``origin`` None, a source made outside any admitted download, counts as the network),
    and when the request overrides one of the source's endpoints: a request's credentials
    go with it, and the node's go only where the node's configuration sends them."""
    own: dict[str, Any] = {}
    if request and source.request_field:
        own = dict(source.request_options(dict(request.get(source.request_field) or {})))
    options = dict(configured)
    defaults = getattr(source.Config, "model_fields", {})
    overridden = [
        k
        for k in endpoint_fields(source)
        if k in own and own[k] != options.get(k, getattr(defaults.get(k), "default", None))
    ]
    if origin is None or origin.from_network or overridden:
        options = _without_secrets(options, credential_fields(source))
    options.update(own)
    return options
