"""Sources over fsspec: ``s3://`` (s3fs), and any other installed fsspec protocol.

``FsspecSource`` is the generic adapter: a URL whose scheme no other source plugin
names, but which fsspec knows (``gs://`` with gcsfs installed, ``abfs://``,
``memory://``, ...), is read through that filesystem. Its options are handed to the
filesystem as they are (``sources: {fsspec: {gs: {token: ...}}}``: one dict per
protocol).

``S3Source`` is the same adapter with S3's options named the way Dragonfly's
``ObjectStorage`` message (and dfget's ``--storage-*`` flags) name them, so a
request can carry its own region, endpoint and credentials.

Reads run on the filesystem's own event loop integration when it is async (s3fs)
and in worker threads otherwise, ``chunk`` bytes per call, so a piece is never held
twice in memory.

Before a filesystem is made, the servers it will talk to are checked against the
source policy (``security.sources``): every endpoint its options name (an S3
``endpoint``, ``client_kwargs.endpoint_url``, a ``host``...) and the host of a url whose
protocol names one (``ftp://HOST/...``), by name and by each address it resolves to.
The clouds' default endpoints are public names and pass.

The node's own cloud credentials (configured keys, and the SDKs' ambient chains: the
environment's ``AWS_*``, ``~/.aws``, instance metadata, Google's and Azure's default
credentials) sign only requests from this node's own clients that name no endpoint of their
own. A request from the network, or one that names its endpoint, carries its own keys or
is sent anonymously (``node_credentials_allowed``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import Source, SourceEntry, SourceInfo
from damselfly.core.errors import BackendError, InvalidArgument, PermissionDenied
from damselfly.hookspecs import hookimpl
from damselfly.plugins.source.http import policy_of, shown
from damselfly.plugins.source.options import FSSPEC_CHUNK, S3Config, credentials_of, endpoints_of, to_fsspec
from damselfly.security.admission import current_origin, current_policy
from damselfly.security.policy import SourcePolicy, check_endpoint

if TYPE_CHECKING:
    from damselfly.contracts import Registry


# schemes the other built-in sources (or fsspec's chaining) own, never taken by the fallback
_NOT_OURS = {"http", "https", "file", "local", "p2p", "hf", "hdfs", "webhdfs", "oci", "blockcache", "filecache"}
# options of fsspec filesystems that name the server they connect to
_ENDPOINT_KEYS = {"endpoint_url", "endpoint", "host", "hostname", "base_url", "server", "account_host"}
# protocols whose url names the server (ftp://HOST/path), not a bucket or an account
_HOST_PROTOCOLS = {"ftp", "sftp", "ssh", "smb", "webdav", "dav", "http", "https"}
# the options that make a cloud filesystem unsigned instead of using its SDK's ambient credentials
_ANONYMOUS = {
    "s3": {"anon": True},
    "s3a": {"anon": True},
    "gs": {"token": "anon"},
    "gcs": {"token": "anon"},
    "abfs": {"anon": True},
    "abfss": {"anon": True},
    "az": {"anon": True},
    "adl": {"anon": True},
}
# options of those filesystems that are credentials of the request's (or the configuration's) own
_KEY_OPTIONS = {"key", "secret", "token", "account_key", "sas_token", "connection_string", "client_secret"}


def _backend_error(exc: BaseException, url: str) -> BackendError:
    """An fsspec exception as a one-line BackendError with the HTTP-like status it means."""
    if isinstance(exc, FileNotFoundError):
        return BackendError(f"not found: {shown(url)}", status_code=404)
    if isinstance(exc, PermissionError):
        return BackendError(shown(f"access denied to {url}: {exc}"), status_code=403)
    if isinstance(exc, IsADirectoryError):
        return BackendError(f"{shown(url)} is a directory", status_code=400)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return BackendError(shown(f"reading {url} failed: {text}"))


class FsspecConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    chunk: int = Field(FSSPEC_CHUNK, ge=64 * 1024, description="Bytes read per call to the filesystem.")


class FsspecSource(Source):
    """Any fsspec protocol as a source (the fallback for schemes no other plugin names)."""

    name: ClassVar[str] = "fsspec"
    schemes: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[BaseModel]] = FsspecConfig

    def __init__(self, options: BaseModel | None = None, *, policy: SourcePolicy | None = None):
        super().__init__(options)
        self.policy = policy or current_policy()  # made for an admitted download: its policy
        self.origin = current_origin()  # likewise its origin (None: made outside any download)
        self._filesystems: dict[str, Any] = {}

    @classmethod
    def handles(cls, scheme: str) -> bool:
        if scheme in _NOT_OURS:
            return False
        try:
            from fsspec.registry import known_implementations, registry
        except ImportError:
            return False
        return scheme in registry or scheme in known_implementations

    @classmethod
    def available(cls) -> str | None:
        try:
            import fsspec  # noqa: F401
        except ImportError:
            return "fsspec is not installed (pip install fsspec)"
        return None

    # -- what subclasses change --------------------------------------------------------

    def storage_options(self, protocol: str) -> dict[str, Any]:
        extra = dict(self.options.model_extra or {})
        options = extra.get(protocol, {})
        if not isinstance(options, dict):
            raise InvalidArgument(f"sources.fsspec.{protocol} must be a mapping of filesystem options")
        return options

    def path_of(self, url: str, fs: Any) -> str:
        return fs._strip_protocol(url)

    def names_own_endpoint(self) -> bool:
        """The request named the server to talk to (the node's credentials are not for it)."""
        return False

    def node_credentials_allowed(self) -> bool:
        """May a filesystem fall back on the node's ambient credentials (the SDK's default chain)?
        Only for a request of this node's own (a local client, the daemon itself) that names no
        endpoint: never for one from the network (or made outside any download)."""
        origin = self.origin
        return origin is not None and not origin.from_network and not self.names_own_endpoint()

    def without_ambient(self, protocol: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` made anonymous when they carry no keys and the node's may not be used."""
        anonymous = _ANONYMOUS.get(protocol)
        if anonymous is None or self.node_credentials_allowed():
            return options
        if any(options.get(k) for k in _KEY_OPTIONS if not (k == "token" and options.get(k) == "anon")):
            return options
        return {**options, **anonymous}

    # -- the source contract -------------------------------------------------------------

    async def filesystem(self, url: str) -> Any:
        import fsspec

        protocol = urlsplit(url).scheme.lower()
        fs = self._filesystems.get(protocol)
        if fs is not None:
            return fs
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise InvalidArgument(f"cannot read {protocol}:// urls: {exc}") from None
        options = self.without_ambient(protocol, self.storage_options(protocol))
        await self.check_servers(url, options)
        if getattr(cls, "async_impl", False):
            fs = cls(asynchronous=True, loop=asyncio.get_running_loop(), skip_instance_cache=True, **options)
            if hasattr(fs, "set_session"):
                await fs.set_session()
        else:
            fs = await asyncio.to_thread(lambda: cls(skip_instance_cache=True, **options))
        self._filesystems[protocol] = fs
        return fs

    async def check_servers(self, url: str, options: dict[str, Any]) -> None:
        """The servers a filesystem for ``url`` with ``options`` would reach, against the policy."""
        policy = self.policy = policy_of(self)
        protocol = urlsplit(url).scheme.lower()
        named = [(value, f"sources.{self.name} {key}") for key, value in _endpoints(options)]
        if protocol in _HOST_PROTOCOLS and urlsplit(url).hostname:
            named.append((url, "the url"))
        for endpoint, setting in named:
            try:
                await check_endpoint(policy, endpoint, setting)
            except PermissionDenied:
                raise
            except OSError as exc:
                raise BackendError(shown(f"cannot resolve {endpoint} ({setting}): {exc}")) from None

    async def _call(self, fs: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if getattr(fs, "async_impl", False) and getattr(fs, "asynchronous", False):
            return await getattr(fs, "_" + name)(*args, **kwargs)
        return await asyncio.to_thread(getattr(fs, name), *args, **kwargs)

    async def stat(self, url: str, headers: dict[str, str]) -> SourceInfo:
        fs = await self.filesystem(url)
        try:
            info = await self._call(fs, "info", self.path_of(url, fs))
        except Exception as exc:  # fsspec backends raise anything; each becomes a one-line error
            raise _backend_error(exc, url) from None
        if info.get("type") == "directory":
            raise BackendError(f"{shown(url)} is a directory (use a recursive download)", status_code=400)
        size = info.get("size")
        meta = {k: str(v) for k, v in info.items() if k in ("ETag", "LastModified", "etag", "mtime")}
        return SourceInfo(int(size) if size is not None else -1, True, meta)

    async def read(self, url: str, offset: int, length: int, headers: dict[str, str]) -> AsyncIterator[bytes]:
        fs = await self.filesystem(url)
        path = self.path_of(url, fs)
        step = getattr(self.options, "chunk", FSSPEC_CHUNK)
        end = offset + length
        while offset < end:
            want = min(step, end - offset)
            try:
                data = await self._call(fs, "cat_file", path, start=offset, end=offset + want)
            except Exception as exc:  # one-line error, whatever the backend raised
                raise _backend_error(exc, url) from None
            if not data:
                raise BackendError(f"{shown(url)} ended {end - offset} bytes early")
            offset += len(data)
            yield data[: len(data) - max(0, offset - end)]

    async def list(self, url: str, headers: dict[str, str]) -> list[SourceEntry]:
        fs = await self.filesystem(url)
        scheme = urlsplit(url).scheme
        try:
            found = await self._call(fs, "find", self.path_of(url, fs), detail=True)
        except Exception as exc:  # as above
            raise _backend_error(exc, url) from None
        return [
            SourceEntry(f"{scheme}://{name.lstrip('/')}", int(info.get("size") or 0), info.get("type") == "directory")
            for name, info in sorted(found.items())
        ]

    async def close(self) -> None:
        for fs in self._filesystems.values():
            session = getattr(fs, "_s3", None)
            if session is not None and getattr(fs, "asynchronous", False):
                try:
                    await session.close()
                except Exception:  # closing a client that already failed: nothing to do
                    pass
        self._filesystems.clear()


def _endpoints(options: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(option path, value) of every endpoint-like option in nested filesystem ``options``."""
    found: list[tuple[str, str]] = []
    if isinstance(options, dict):
        for key, value in options.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                found += _endpoints(value, path + ".")
            elif key in _ENDPOINT_KEYS and isinstance(value, str) and value:
                found.append((path, value))
    return found


class S3Source(FsspecSource):
    """``s3://bucket/key`` through s3fs, options as Dragonfly's ``ObjectStorage`` names them
    (``S3Config`` says how each reaches it)."""

    name: ClassVar[str] = "s3"
    schemes: ClassVar[tuple[str, ...]] = ("s3", "s3a")
    request_field: ClassVar[str] = S3Config.message
    # the node's keys never go with a request from the network, nor to an endpoint a request names
    credential_fields: ClassVar[frozenset[str]] = credentials_of(S3Config)
    endpoint_fields: ClassVar[frozenset[str]] = endpoints_of(S3Config)
    Config: ClassVar[type[BaseModel]] = S3Config
    options: S3Config

    @classmethod
    def handles(cls, scheme: str) -> bool:
        return False

    @classmethod
    def request_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A request's ``ObjectStorage`` values; one that names an endpoint is marked so (it
        gets no ambient credentials), and it cannot set the mark itself."""
        out = super().request_options(values)
        out.pop("endpoint_from_request", None)
        if out.get("endpoint"):
            out["endpoint_from_request"] = True
        return out

    def names_own_endpoint(self) -> bool:
        return self.options.endpoint_from_request

    @classmethod
    def available(cls) -> str | None:
        try:
            import s3fs  # noqa: F401
        except ImportError:
            return "s3fs is not installed (pip install 'damselfly[s3]')"
        return None

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """s3fs's options, under the names ``S3Config`` gives them. The keys go only with their id,
        and then the secret always (an empty one fails as a wrong one does)."""
        o = self.options
        if not o.access_key_id:
            return to_fsspec(o, leave_out=self.credential_fields)
        return {"secret": o.access_key_secret, **to_fsspec(o)}

    async def filesystem(self, url: str) -> Any:
        if urlsplit(url).scheme.lower() == "s3a":
            url = "s3" + url[3:]
        return await super().filesystem(url)

    def path_of(self, url: str, fs: Any) -> str:
        parts = urlsplit(url)
        if not parts.netloc:
            raise InvalidArgument(f"s3 url {shown(url)!r} names no bucket (s3://bucket/key)")
        return f"{parts.netloc}{parts.path}"


@hookimpl
def damselfly_add_sources(registry: Registry[Source]) -> None:
    registry.add(S3Source)
    registry.add(FsspecSource)
