"""The options of the sources a request can configure (s3, hdfs, hf), each described once.

Every field of these ``Config`` models says, beside its meaning, how it travels
(``RequestOption``, as ``Annotated`` metadata): whether the Download's message for the
source (``ObjectStorage``, ``HDFS``, ``HuggingFace``) carries it under the same name,
the ``damselfly get`` flag that sets it (dfget's), whether it is a credential or names
the server, and the names a target filesystem's fsspec options give it. From this one
description the sources take their ``request_field``, ``credential_fields`` and
``endpoint_fields``; ``damselfly get`` its flags (``flags``, ``from_flags``); p2pfs its
reading of fsspec options (``from_fsspec``); and S3 its filesystem's options
(``to_fsspec``). The scheduler's list of the protocol's secret fields
(``rpc.wire.SOURCE_SECRETS``, which also covers the messages no source of ours reads)
cannot import plugins, so a test checks it against these models.

This module imports no client library: front ends read it without loading aiohttp or s3fs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

FSSPEC_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class RequestOption:
    """How one option of a source reaches it, besides the node's configuration."""

    wire: bool = True  # the source's message in a Download has a field of this name
    flag: str = ""  # the `damselfly get` flag that sets it (dfget's), e.g. --storage-region
    flag_help: str = ""
    credential: bool = False  # the node's value never goes with a request from the network
    endpoint: bool = False  # names the server (or how it is trusted): a request that changes it is another task
    fsspec: tuple[str, ...] = ()  # its names in a filesystem's options, dotted; the first is the one written
    negated: bool = False  # the fsspec option says the opposite (verify=False: insecure_skip_verify)


@dataclass(frozen=True, slots=True)
class Flag:
    """A ``damselfly get`` flag that sets one field of a Download's source message."""

    option: str  # --storage-region
    help: str
    message: str  # object_storage
    field: str  # region

    @property
    def param(self) -> str:
        """The flag's parameter name (click's): storage_region."""
        return self.option.lstrip("-").replace("-", "_")


class RequestConfig(BaseModel):
    """Options of a source that a request's message (``message``) can set."""

    # the Download's field this source reads a request's options from
    message: ClassVar[str] = ""
    # the fsspec protocols whose filesystem options name this source's options (p2pfs)
    fsspec_protocols: ClassVar[tuple[str, ...]] = ()
    # fields of the message this source does not read, which a request may still carry
    # (dfget's flags set them for other backends of Dragonfly's)
    carried: ClassVar[dict[str, RequestOption]] = {}


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect to the origin.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds a read may stall.")
    verify_tls: bool = Field(True, description="Verify the origin's certificate.")
    read_buffer: int = Field(
        1 << 20,
        ge=1 << 16,
        le=1 << 30,
        description="Bytes of a response buffered ahead of the reader (aiohttp's read_bufsize): the socket "
        "is read ahead while the consumer is busy elsewhere, so the origin's sending stalls less on it.",
    )
    socket_buffer: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="SO_RCVBUF of origin connections (0: the kernel's autotuning). Autotuning sizes the buffer "
        "to what is read per round trip, so on a short path a reader that pauses (a busy seed) stops the "
        "sender; a fixed buffer rides the pause out, but caps each connection at buffer / round trip.",
    )


class S3Config(RequestConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    message: ClassVar[str] = "object_storage"
    fsspec_protocols: ClassVar[tuple[str, ...]] = ("s3", "s3a")
    carried: ClassVar[dict[str, RequestOption]] = {
        "credential_path": RequestOption(  # a file on the requester's node (GCS)
            flag="--storage-credential-path", flag_help="Object storage credential file (GCS).", credential=True
        ),
        "predefined_acl": RequestOption(flag="--storage-predefined-acl", flag_help="Object storage predefined ACL."),
        "security_token": RequestOption(credential=True),
    }

    region: Annotated[
        str,
        RequestOption(
            flag="--storage-region",
            flag_help="Object storage region.",
            fsspec=("client_kwargs.region_name", "region_name"),
        ),
    ] = Field("", description="Bucket region (dfget --storage-region).")
    endpoint: Annotated[
        str,
        RequestOption(
            flag="--storage-endpoint",
            flag_help="Object storage endpoint URL.",
            endpoint=True,
            # s3fs takes both (and refuses two different ones)
            fsspec=("client_kwargs.endpoint_url", "endpoint_url"),
        ),
    ] = Field("", description="S3 API endpoint URL, e.g. http://127.0.0.1:9000 (--storage-endpoint).")
    access_key_id: Annotated[
        str,
        RequestOption(
            flag="--storage-access-key-id",
            flag_help="Object storage access key id.",
            credential=True,
            fsspec=("key",),
        ),
    ] = Field("", description="Access key id (--storage-access-key-id); empty: the usual chain.")
    access_key_secret: Annotated[
        str,
        RequestOption(
            flag="--storage-access-key-secret",
            flag_help="Object storage secret access key.",
            credential=True,
            fsspec=("secret",),
        ),
    ] = Field("", description="Secret access key (--storage-access-key-secret).")
    session_token: Annotated[
        str,
        RequestOption(
            flag="--storage-session-token",
            flag_help="Object storage session token.",
            credential=True,
            fsspec=("token",),
        ),
    ] = Field("", description="Session token of temporary credentials (--storage-session-token).")
    insecure_skip_verify: Annotated[
        bool, RequestOption(endpoint=True, fsspec=("client_kwargs.verify",), negated=True)
    ] = Field(False, description="Do not verify the endpoint's TLS certificate.")
    anonymous: Annotated[bool, RequestOption(wire=False, fsspec=("anon",))] = Field(
        False, description="Unsigned requests (public buckets)."
    )
    chunk: int = Field(FSSPEC_CHUNK, ge=64 * 1024, description="Bytes per ranged GET.")
    endpoint_from_request: bool = Field(
        False, description="Set for a request that names its endpoint: the node's ambient credentials stay home."
    )


class HdfsConfig(HttpConfig, RequestConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    message: ClassVar[str] = "hdfs"
    fsspec_protocols: ClassVar[tuple[str, ...]] = ("webhdfs", "hdfs")

    port: Annotated[int, RequestOption(wire=False, endpoint=True)] = Field(
        9870, ge=1, le=65535, description="WebHDFS port when the url names none."
    )
    use_https: Annotated[bool, RequestOption(wire=False, endpoint=True)] = Field(
        False, description="Talk to the namenode over HTTPS (swebhdfs)."
    )
    user: Annotated[str, RequestOption(wire=False, credential=True)] = Field(
        "", description="user.name for simple authentication."
    )
    delegation_token: Annotated[
        str,
        RequestOption(
            flag="--hdfs-delegation-token", flag_help="HDFS delegation token.", credential=True, fsspec=("token",)
        ),
    ] = Field("", description="Delegation token (dfget --hdfs-delegation-token).")


class HfConfig(HttpConfig, RequestConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)
    message: ClassVar[str] = "hugging_face"
    fsspec_protocols: ClassVar[tuple[str, ...]] = ("hf",)

    token: Annotated[
        str,
        RequestOption(flag="--hf-token", flag_help="Hugging Face access token.", credential=True, fsspec=("token",)),
    ] = Field("", description="Hugging Face access token (dfget --hf-token); empty: anonymous.")
    revision: Annotated[
        str,
        RequestOption(
            flag="--hf-revision", flag_help="Hugging Face revision (branch, tag or commit).", fsspec=("revision",)
        ),
    ] = Field("main", description="Branch, tag or commit when the url names none (--hf-revision).")
    base_url: Annotated[str, RequestOption(endpoint=True, fsspec=("endpoint",))] = Field(
        "https://huggingface.co", description="Hub endpoint (a mirror, or a local test hub)."
    )


# the sources' configs a request can set, in the order of dfget's flags
REQUEST_CONFIGS: tuple[type[RequestConfig], ...] = (S3Config, HdfsConfig, HfConfig)


# -- reading the description ---------------------------------------------------------------


def described(config: type[BaseModel]) -> Iterator[tuple[str, RequestOption]]:
    """The fields of ``config`` that carry a ``RequestOption``, in order, then its ``carried`` ones."""
    for name, info in config.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, RequestOption):
                yield name, meta
    yield from getattr(config, "carried", {}).items()


def _own(config: type[BaseModel]) -> Iterator[tuple[str, RequestOption]]:
    return ((name, o) for name, o in described(config) if name in config.model_fields)


def credentials_of(config: type[BaseModel]) -> frozenset[str]:
    """The options of ``config`` that are credentials (``Source.credential_fields``)."""
    return frozenset(name for name, o in _own(config) if o.credential)


def endpoints_of(config: type[BaseModel]) -> frozenset[str]:
    """The options of ``config`` that name the server it talks to (``Source.endpoint_fields``)."""
    return frozenset(name for name, o in _own(config) if o.endpoint)


def wire_fields(config: type[BaseModel], *, credential: bool | None = None, endpoint: bool | None = None) -> set[str]:
    """The fields of ``config``'s message that it describes (its own and the carried ones),
    only the credentials or only the endpoints when asked."""
    return {
        name
        for name, o in described(config)
        if o.wire
        and (credential is None or o.credential == credential)
        and (endpoint is None or o.endpoint == endpoint)
    }


def flags() -> list[Flag]:
    """The flags of ``damselfly get`` that set the Download's source messages, in dfget's order."""
    return [
        Flag(o.flag, o.flag_help, config.message, name)
        for config in REQUEST_CONFIGS
        for name, o in described(config)
        if o.flag
    ]


def from_flags(values: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The Download's source messages from the flags' values (by ``Flag.param``): each message
    with a flag set, with the fields that are set."""
    out: dict[str, dict[str, str]] = {}
    for flag in flags():
        if value := values.get(flag.param):
            out.setdefault(flag.message, {})[flag.field] = value
    return out


def _lookup(options: Mapping[str, Any], path: str) -> Any:
    value: Any = options
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def from_fsspec(protocol: str, options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The Download's source message for a target filesystem's ``options`` (``s3={...}``):
    each field its fsspec names give, the first that is set; {} when no message is for ``protocol``."""
    for config in REQUEST_CONFIGS:
        if protocol not in config.fsspec_protocols:
            continue
        mapped: dict[str, Any] = {}
        for name, o in described(config):
            if not (o.wire and o.fsspec):
                continue
            if o.negated:
                value: Any = any(_lookup(options, path) is False for path in o.fsspec)
            else:
                value = next((v for path in o.fsspec if (v := _lookup(options, path))), None)
            if value:
                mapped[name] = value
        return {config.message: mapped} if mapped else {}
    return {}


def to_fsspec(options: BaseModel, leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``options`` as a filesystem's options: each field that is set (and not in ``leave_out``)
    under its first fsspec name."""
    out: dict[str, Any] = {}
    for name, o in _own(type(options)):
        value = getattr(options, name)
        if not o.fsspec or name in leave_out or not value:
            continue
        *parents, key = o.fsspec[0].split(".")
        where = out
        for parent in parents:
            where = where.setdefault(parent, {})
        where[key] = not value if o.negated else value
    return out
