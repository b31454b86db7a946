"""One root ``Settings``: constructor arguments, then ``DAMSELFLY_*`` env, then YAML.

Env variables use ``__`` between levels (``DAMSELFLY_DAEMON__CONCURRENT_PIECES=4``);
the YAML file is named by ``--config`` or ``DAMSELFLY_CONFIG``. Settings are frozen
once validated. A plugin's section (storage, transports, sources) is a ``type``
plus free options that the plugin's own ``Config`` model validates.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from damselfly.core.errors import InvalidArgument
from damselfly.core.units import parse_rate, parse_size

CONFIG_ENV = "DAMSELFLY_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginsConfig(Section):
    autoload: bool = Field(True, description="Load third-party plugins from the `damselfly` entry-point group.")
    block: list[str] = Field(default_factory=list, description="Plugin names (or module names) never to register.")
    load: list[str] = Field(
        default_factory=list, description="Extra plugin modules to import and register, by dotted path."
    )


class LogConfig(Section):
    level: str = Field("INFO", description="Log level of the CLI and services' sink.")
    json_format: bool = Field(False, alias="json", description="Log one JSON object a line.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HostConfig(Section):
    ip: str = Field("127.0.0.1", description="The address other peers reach this host at.")
    hostname: str = Field(default_factory=socket.gethostname, description="Host name used in host and peer ids.")
    idc: str = Field("", description="IDC (data centre) for affinity scoring.")
    location: str = Field("", description="Location, `|`-separated from coarse to fine, for affinity scoring.")
    max_tx_bandwidth: int = Field(
        10_000_000_000 // 8,
        description="Upload capacity in bytes/s (accepts `1.25GB/s`, `10Gbit/s`).",
    )
    max_rx_bandwidth: int = Field(10_000_000_000 // 8, description="Download capacity in bytes/s.")

    @field_validator("max_tx_bandwidth", "max_rx_bandwidth", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> int:
        return parse_rate(v) if isinstance(v, str) else v


class PluginChoice(BaseModel):
    """``type`` names a registered plugin; the other keys are its options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field(description="Registered plugin name.")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GcConfig(Section):
    interval: float = Field(60.0, gt=0, description="Seconds between garbage collections.")
    task_ttl: float = Field(21600.0, gt=0, description="Seconds a task unused (not read, served or written) is kept.")
    quota: int = Field(0, ge=0, description="Bytes of content kept at most (0: judge by the disk's own usage).")
    high_watermark: float = Field(80.0, gt=0, le=100, description="Percent of quota (or disk) that starts eviction.")
    low_watermark: float = Field(60.0, ge=0, lt=100, description="Percent eviction brings usage down to.")
    serving_grace: float = Field(30.0, ge=0, description="Seconds after its last served piece a task counts as in use.")

    @field_validator("quota", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v


# A daemon's fetches from parents at once when ``daemon.concurrent_pieces`` is 0: six on a peer (its
# link is full with six 4 MiB or 1 MiB pieces in flight, and more spreads it over more parents than
# the swarm can feed); one on a seed, whose download comes before the children it serves.
PEER_CONCURRENT_PIECES = 6
SEED_CONCURRENT_PIECES = 1
MAX_SOURCE_READS = 4  # concurrent reads of the source when ``source_concurrent_pieces`` is 0
SOURCE_READ_SPAN = 64 << 20  # bytes each of them covers at least


class DaemonConfig(Section):
    seed: bool = Field(False, description="Run as a seed peer (the one that goes back to source).")
    data_dir: Path = Field(
        Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "damselfly",
        description="Where the daemon keeps tasks, its socket and its certificates.",
    )
    socket: Path | None = Field(None, description="Unix socket for local clients (default DATA_DIR/dfdaemon.sock).")
    listen_ip: str = Field("127.0.0.1", description="Address the upload and piece servers bind.")
    upload_port: int = Field(0, ge=0, le=65535, description="DfdaemonUpload gRPC port (0: the OS picks).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0: the OS picks).")
    schedulers: list[str] = Field(default_factory=list, description="Scheduler addresses `host:port`.")
    storage: PluginChoice = Field(PluginChoice(type="disk"), description="Storage plugin and its options.")
    transports: list[PluginChoice] = Field(
        default_factory=lambda: [PluginChoice(type="tcp")],
        description="Piece transports to serve and to try, in order.",
    )
    piece_port: int = Field(0, ge=0, le=65535, description="Port of the first transport's piece server.")
    concurrent_pieces: int = Field(
        0,
        ge=0,
        le=256,
        description="Pieces fetched from parents at once per download (0: chosen by role, "
        f"{PEER_CONCURRENT_PIECES} on a peer, {SEED_CONCURRENT_PIECES} on a seed, whose own download comes first).",
    )
    piece_picker: str = Field(
        "rarest-first",
        description="Piece-picker plugin: the order missing pieces are fetched in (`rarest-first` spreads copies "
        "through the swarm soonest; `sequential` is upstream's order).",
    )
    super_seed: bool = Field(
        False,
        description="On a seed: tell one child at a time of each new piece, so each leaves the seed once at first.",
    )
    offer_timeout: float = Field(
        2.0, gt=0, description="On a super-seeding seed: seconds before an offered piece is offered to one more child."
    )
    offers_per_child: int = Field(
        1, ge=1, le=64, description="On a super-seeding seed: its pieces one child may be offered and not have yet."
    )
    upload_slots: int = Field(
        6,
        ge=0,
        description="Pieces sent to children at once (0: no limit); a child that finds them taken asks elsewhere.",
    )
    upload_wait: float = Field(
        0.0, ge=0, description="Seconds a request waits for a free upload slot before the answer is busy."
    )
    busy_backoff: float = Field(
        0.2, gt=0, description="Seconds before a parent that answered busy (its upload slots taken) is asked again."
    )
    endgame_duplicates: int = Field(
        1,
        ge=0,
        le=4,
        description="Endgame: once every missing piece is in flight, fetch each from this many more parents "
        "(the first copy wins, the others are cancelled; 0: off).",
    )
    seed_extra_pieces: int = Field(
        1,
        ge=0,
        le=16,
        description="Fetches from seeds a download may run beyond concurrent_pieces (a new piece waits for none).",
    )
    source_concurrent_pieces: int = Field(
        0,
        ge=0,
        le=256,
        description="Reads of the source at once (0: one per 64 MiB missing, at most "
        f"{MAX_SOURCE_READS}: a share of a shared read, or a small task, comes in one read, whole soonest).",
    )
    share_concurrent_pieces: int = Field(
        4,
        ge=0,
        le=256,
        description="Fetches from peers while this download reads its share of a shared source read "
        "(0: concurrent_pieces); fewer leave more of the host's download to the share, whose pieces "
        "are new to the swarm.",
    )
    source_stream: bool = Field(
        True,
        description="Read a whole task from the source in one request, cutting pieces as the bytes arrive "
        "(else one ranged read per piece, source_concurrent_pieces at once).",
    )
    piece_timeout: float = Field(60.0, gt=0, description="Seconds one piece may take from a parent.")
    piece_connect_timeout: float = Field(3.0, gt=0, description="Seconds to open a piece connection to a parent.")
    gc: GcConfig = Field(default_factory=GcConfig, description="Garbage collection of stored tasks.")
    parent_gather_window: float = Field(
        0.0, ge=0, description="Seconds a reported piece waits for other parents to report it too."
    )
    schedule_timeout: float = Field(30.0, gt=0, description="Seconds to wait for parents before asking again.")
    stall_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a piece fetch may move no bytes before it is cancelled and another holder asked; "
        "a download with no progress that long asks the scheduler for other parents, and fails after a second period.",
    )
    schedule_retries: int = Field(5, ge=1, description="Reschedules before falling back to the source.")
    disable_back_to_source: bool = Field(False, description="Never read the origin from this daemon.")
    source_retries: int = Field(
        3, ge=0, le=20, description="Times a read of the origin is tried again after a 429, 500, 502, 503 or 504."
    )
    source_retry_backoff: float = Field(
        0.5,
        gt=0,
        description="Seconds before the first retry of the origin when it names no Retry-After; doubles per "
        "retry, each delay jittered between half and all of it.",
    )
    source_retry_budget: float = Field(
        30.0,
        ge=0,
        description="Seconds a read of the origin may spend waiting between retries in all; a Retry-After "
        "beyond what is left ends it.",
    )
    source_host_reads: int = Field(
        16, ge=1, le=1024, description="Reads of one origin (scheme://host:port) at once from this daemon."
    )
    announce_interval: float = Field(300.0, gt=0, description="Seconds between AnnounceHost calls.")
    reannounce_rate: float = Field(
        20.0,
        gt=0,
        description="Stored finished tasks per second a daemon announces to a scheduler new to it "
        "(at start, after that scheduler restarted, or when it answers again after failing).",
    )
    scheduler_connect_timeout: float = Field(3.0, gt=0, description="Seconds to reach a scheduler.")

    @model_validator(mode="after")
    def _by_role(self) -> DaemonConfig:
        """Settings left at 0 ("chosen by role") take the value for a seed or a peer."""
        if self.concurrent_pieces == 0:
            chosen = SEED_CONCURRENT_PIECES if self.seed else PEER_CONCURRENT_PIECES
            object.__setattr__(self, "concurrent_pieces", chosen)  # frozen: set once, while validating
        return self

    def source_reads(self, missing_bytes: int) -> int:
        """Concurrent reads of the source for ``missing_bytes``: ``source_concurrent_pieces``, else
        one per SOURCE_READ_SPAN, at most MAX_SOURCE_READS."""
        if self.source_concurrent_pieces:
            return self.source_concurrent_pieces
        return max(1, min(MAX_SOURCE_READS, -(-missing_bytes // SOURCE_READ_SPAN)))


class SchedulerConfig(Section):
    listen_ip: str = Field("127.0.0.1", description="Address the scheduler binds.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0: the OS picks).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port.")
    grpc_server: Literal["native", "grpcio"] = Field(
        "native",
        description="What serves the scheduler's gRPC: 'native' (damselfly.rpc.server, HTTP/2 in the event "
        "loop, about a tenth of grpcio's CPU per stream) or 'grpcio' (grpcio's asyncio server).",
    )
    strategy: str = Field(
        "swarm",
        description="Parent-selection strategy plugin: `swarm` (a mesh, every peer uploads), `dragonfly` "
        "(upstream's evaluator and DAG), `random`, `locality`.",
    )
    candidate_parent_limit: int = Field(3, ge=1, description="Parents returned per schedule.")
    filter_parent_limit: int = Field(15, ge=1, description="Candidates sampled before ranking.")
    retry_interval: float = Field(0.5, gt=0, description="Seconds between scheduling rounds when no parent fits.")
    seed_wait: float = Field(
        60.0,
        gt=0,
        description="Seconds a peer waits for the seed before it is told to go back to source.",
    )
    back_to_source_limit: int = Field(200, ge=0, description="Peers of one task allowed to go back to source.")
    origin_reads: int = Field(
        64,
        ge=0,
        description="Peers the scheduler lets read one origin (scheme://host:port) at once, across its tasks; "
        "others wait for parents or a free read (0: no cap). A seed the scheduler itself sent always reads.",
    )
    seed_trigger: bool = Field(True, description="Make a seed peer fetch new tasks from the source.")
    source_shares: bool = Field(
        True,
        description="Share a new task's read of the source: when its seed registers, the seed and each "
        "damselfly peer then waiting read different blocks of pieces from the source, once each, and get "
        "the rest from each other (origin bytes stay 1 x the task; the origin's bandwidth beyond one "
        "host's link is used). Mesh strategies only (swarm): in a DAG pieces never flow up to a parent.",
    )
    source_share_readers: int = Field(
        0,
        ge=0,
        le=1024,
        description="With source_shares: at most this many peers (the seed first) read a block of the source at "
        "once; the others fetch from them (0: every peer waiting).",
    )
    source_share_wait: float = Field(
        0.2,
        ge=0,
        description="With source_shares: seconds the seed of a new task waits before the read is split, "
        "so that the peers that started the task at about the same time are among the readers.",
    )
    host_gc_interval: float = Field(60.0, gt=0, description="Seconds between sweeps for silent hosts and old peers.")
    peer_ttl: float = Field(
        86400.0,
        gt=0,
        description="Seconds a peer is kept after its last message; a finished peer is kept while its host announces.",
    )


class ProxyConfig(Section):
    enabled: bool = Field(True, description="Serve the HTTP proxy and registry mirror.")
    port: int = Field(0, ge=0, le=65535, description="Proxy port (0: the OS picks; Dragonfly uses 4001).")
    registry_mirror: str = Field("", description="Default upstream registry, e.g. https://index.docker.io.")
    rules: list[str] = Field(
        default_factory=lambda: ["blobs/sha256.*"], description="URL regexes of GETs that go through the swarm."
    )
    insecure_registries: list[str] = Field(
        default_factory=list, description="host:port of registries reached over plain HTTP (loopback always is)."
    )
    auth_cache_ttl: float = Field(60.0, ge=0, description="Seconds a registry's yes to a client's credentials holds.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect to an upstream.")
    read_timeout: float = Field(300.0, gt=0, description="Seconds an upstream read may stall.")
    connect_allow: list[str] = Field(
        default_factory=list,
        description="`host:port` globs that CONNECT and absolute-form requests may reach (none by default: 403).",
    )
    tls: bool = Field(
        False,
        description="Serve the proxy's clients over mutual TLS with security.tls (a client shows a certificate of "
        "the cluster CA), for proxies that clients reach across hosts.",
    )
    username: str = Field("", description="Proxy authentication (Basic): a client must send these credentials.")
    password: str = Field("", description="Password of proxy authentication.")


class TlsConfig(Section):
    ca: Path | None = Field(None, description="PEM file of the cluster CA: peers' certificates must chain to it.")
    cert: Path | None = Field(None, description="PEM file of this process's certificate (`damselfly certs issue`).")
    key: Path | None = Field(None, description="PEM file of this process's private key.")
    verify_address: bool = Field(
        True, description="Check a peer's certificate names the address it was reached at (unlike upstream)."
    )

    @property
    def enabled(self) -> bool:
        return self.ca is not None and self.cert is not None and self.key is not None


class SourcePolicyConfig(Section):
    schemes: list[str] = Field(
        default_factory=lambda: [
            "http",
            "https",
            "s3",
            "gs",
            "gcs",
            "abfs",
            "az",
            "oss",
            "hdfs",
            "webhdfs",
            "hf",
            "oci",
        ],
        description="URL schemes a request from the network may have fetched from the source "
        "(`file` and other local schemes only ever from the local socket).",
    )
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Source hosts (`host` or `host:port`, `*` globs) allowed; empty: any host whose address passes.",
    )
    deny_hosts: list[str] = Field(default_factory=list, description="Source hosts refused (globs), before allow_hosts.")
    allow_loopback: bool = Field(False, description="Allow origins on loopback addresses (127.0.0.0/8, ::1).")
    allow_private: bool = Field(
        False, description="Allow origins on private addresses (10/8, 172.16/12, 192.168/16, fc00::/7, 100.64/10)."
    )
    allow_link_local: bool = Field(
        False, description="Allow link-local origins (169.254/16, fe80::/10), the cloud metadata address included."
    )
    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs allowed whatever the rules above say, e.g. an in-cluster registry."
    )
    max_redirects: int = Field(5, ge=0, le=20, description="Redirects followed, each checked like the first URL.")


class LimitsConfig(Section):
    max_hosts: int = Field(10_000, ge=1, description="Hosts the scheduler keeps at most; past it, AnnounceHost fails.")
    max_tasks: int = Field(100_000, ge=1, description="Tasks the scheduler keeps at most.")
    max_peers: int = Field(200_000, ge=1, description="Peers the scheduler keeps at most.")
    grpc_max_streams: int = Field(
        1000, ge=1, description="Concurrent streams one HTTP/2 connection may open (REFUSED_STREAM past it)."
    )
    piece_connections: int = Field(1024, ge=1, description="Connections the piece server accepts at once.")
    piece_idle_timeout: float = Field(120.0, gt=0, description="Seconds an idle piece connection is kept open.")
    vortex_error_frames: int = Field(
        64, ge=1, description="Error frames one Vortex connection may send before it is dropped."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a proxy client has to send its request headers, and a piece connection to finish "
        "its TLS handshake.",
    )


class SecurityConfig(Section):
    tls: TlsConfig = Field(default_factory=TlsConfig, description="Mutual TLS on every listener that crosses hosts.")
    sources: SourcePolicyConfig = Field(
        default_factory=SourcePolicyConfig, description="Which origins requests from the network may reach."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Bounds on what the network may ask.")
    socket_mode: int = Field(0o600, ge=0, le=0o777, description="Mode of the daemon's unix socket.")
    socket_group: str = Field("", description="Group given the socket (with socket_mode 0660, its members may use it).")
    piece_digest: Literal["sha256", "blake3", "crc32"] = Field(
        "blake3",
        description="Digest the source reader computes per piece and children check: blake3 (as strong as "
        "sha256 and about 3.5 x cheaper here) or sha256; crc32 "
        "is what upstream Dragonfly peers report and can be forged (benchmarks and interop only; warns).",
    )


class Settings(BaseSettings):
    """The effective configuration of a damselfly process."""

    model_config = SettingsConfigDict(
        env_prefix="DAMSELFLY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    plugins: PluginsConfig = Field(default_factory=PluginsConfig, description="Plugin loading.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging of services and the CLI.")
    host: HostConfig = Field(default_factory=HostConfig, description="This host's identity and capacity.")
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="The peer daemon.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="The scheduler service.")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="The daemon's proxy and registry mirror.")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="Trust, TLS and bounds.")
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options of source plugins by name, e.g. `{s3: {endpoint: ..., region: ...}}`.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = settings_cls.model_config.get("yaml_file") or os.environ.get(CONFIG_ENV)
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket or self.daemon.data_dir / "dfdaemon.sock"


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(repr(str(p))[1:-1] for p in err["loc"]) or "config"  # a key's line break stays escaped
        parts.append(f"{where}: {err['msg']}")
    return "invalid config: " + "; ".join(parts)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; a bad file or value raises InvalidArgument naming the field."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise InvalidArgument(f"config file {str(path)!r} does not exist")
    elif (env_path := os.environ.get(CONFIG_ENV)) and not Path(env_path).is_file():
        raise InvalidArgument(f"config file {env_path!r} (from {CONFIG_ENV}) does not exist")
    else:
        env_path = os.environ.get(CONFIG_ENV)
        path = Path(env_path) if env_path else None
    cls: type[Settings] = Settings
    if path is not None:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(path)}})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise InvalidArgument(_one_line(exc)) from None
    except Exception as exc:  # a YAML syntax error arrives as yaml.YAMLError
        raise InvalidArgument(f"invalid config: {exc}".splitlines()[0]) from None


def reference_markdown() -> str:
    """Every setting as a Markdown table: field, env variable, default, meaning."""
    lines = ["| field | env | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not PluginChoice:
                walk(ann, f"{prefix}{name}.")
                continue
            default: Any = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump()
            elif isinstance(default, list):
                default = [d.model_dump() if isinstance(d, BaseModel) else d for d in default]
            if name == "hostname":
                default = "(the host name)"
            elif name == "data_dir":
                default = "~/.local/share/damselfly"
            env = "DAMSELFLY_" + f"{prefix}{name}".upper().replace(".", "__")
            lines.append(f"| `{prefix}{name}` | `{env}` | `{default}` | {f.description} |")

    walk(Settings, "")
    return "\n".join(lines)
