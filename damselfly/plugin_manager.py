"""Builds the plugin manager from settings and wraps it in one typed class.

Built-in plugins are registered exactly like third-party ones: modules with
hook implementations. Then ``damselfly`` entry points load (unless autoload is
off), then extra modules named in config; blocked names never register.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pluggy
from loguru import logger

from damselfly import hookspecs
from damselfly.config import PluginChoice, Settings
from damselfly.contracts import PiecePicker, Plugin, Registry, Source, Storage, Strategy, Transport
from damselfly.core.errors import InvalidArgument, Unavailable
from damselfly.security.admission import Origin, current_origin, source_options
from damselfly.security.policy import SourcePolicy

ENTRY_POINT_GROUP = "damselfly"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "damselfly.plugins.source.http",
    "damselfly.plugins.source.file",
    "damselfly.plugins.source.fsspec_source",
    "damselfly.plugins.source.hf",
    "damselfly.plugins.source.hdfs",
    "damselfly.plugins.source.cache",
    "damselfly.plugins.source.oci",
    "damselfly.plugins.transport.tcp",
    "damselfly.plugins.transport.quic",
    "damselfly.plugins.transport.webrtc",
    "damselfly.plugins.transport.rdma",
    "damselfly.plugins.storage.disk",
    "damselfly.plugins.storage.memory",
    "damselfly.plugins.scheduler.dragonfly",
    "damselfly.plugins.scheduler.random",
    "damselfly.plugins.scheduler.locality",
    "damselfly.plugins.scheduler.swarm",
    "damselfly.plugins.picker.pickers",
)


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    kind: str
    origin: str  # "builtin", "entry point DIST VERSION" or "module NAME"
    cls: type[Plugin]
    unavailable: str | None


class Plugins:
    """The one typed door to hooks: the rest of damselfly never calls ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager, settings: Settings):
        self.pm = pm
        self.settings = settings
        self.sources = Registry[Source]("source", Source)
        self.transports = Registry[Transport]("transport", Transport)
        self.storages = Registry[Storage]("storage", Storage)
        self.strategies = Registry[Strategy]("strategy", Strategy)
        self.pickers = Registry[PiecePicker]("piece picker", PiecePicker)
        self._dists: dict[str, str] = {}
        for plugin, dist in pm.list_plugin_distinfo():
            self._dists[getattr(plugin, "__name__", "")] = f"entry point {dist.project_name} {dist.version}"
        hook = pm.hook
        hook.damselfly_add_sources(registry=self.sources)
        hook.damselfly_add_transports(registry=self.transports)
        hook.damselfly_add_storages(registry=self.storages)
        hook.damselfly_add_strategies(registry=self.strategies)
        hook.damselfly_add_piece_pickers(registry=self.pickers)
        blocked = set(settings.plugins.block)
        for reg in self._registries():
            for name in blocked & set(reg.names()):
                reg.remove(name)

    def _registries(self) -> tuple[Registry[Any], ...]:
        return (self.sources, self.transports, self.storages, self.strategies, self.pickers)

    def _origin(self, cls: type) -> str:
        module = cls.__module__
        if module.startswith("damselfly.plugins."):
            return "builtin"
        for plugin_module, origin in self._dists.items():
            if module == plugin_module or module.startswith(plugin_module + "."):
                return origin
        top = module.split(".")[0]
        for plugin_module, origin in self._dists.items():
            if plugin_module.split(".")[0] == top:
                return origin
        return f"module {module}"

    # -- the calls the rest of the code makes -------------------------------------

    def info(self) -> list[PluginInfo]:
        return [
            PluginInfo(c.name, reg.kind, self._origin(c), c, c.available())
            for reg in self._registries()
            for c in reg.classes()
        ]

    def source_for(self, url: str) -> type[Source]:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a malformed port or IPv6 host)
        except ValueError as exc:
            raise InvalidArgument(f"invalid url {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if not scheme or not (parts.netloc or parts.path):
            raise InvalidArgument(
                f"{url!r} is not a url: expected SCHEME://..., e.g. https://host/path or file:///path "
                f"(schemes: {', '.join(self.source_schemes())})"
            )
        classes = self.sources.classes()
        for cls in classes:
            if scheme in cls.schemes:
                return cls
        for cls in classes:
            if cls.handles(scheme):
                return cls
        raise InvalidArgument(
            f"no source plugin handles {scheme}:// urls (url {url!r}); supported: {', '.join(self.source_schemes())}"
            " and the protocols of installed fsspec filesystems"
        )

    def source_schemes(self) -> list[str]:
        """The schemes the registered source plugins name (the fsspec adapter takes more)."""
        return sorted({scheme for cls in self.sources.classes() for scheme in cls.schemes})

    def make_source(
        self, url: str, request: dict[str, dict[str, Any]] | None = None, *, origin: Origin | None = None
    ) -> Source:
        """A source for ``url``: options from config (``sources.NAME``), then from the request;
        the node's credentials only where the admission rules allow (``source_options``), and the
        source policy set on the source, which checks it where it connects."""
        cls = self.source_for(url)
        origin = origin if origin is not None else current_origin()
        options = source_options(cls, self.settings.sources.get(cls.name, {}), request, origin)
        source = cls(cls.parse_options(options, f"sources.{cls.name}"))
        source.policy = SourcePolicy.from_config(self.settings.security.sources)
        return source

    def make_storage(self, choice: PluginChoice, data_dir: Any) -> Storage:
        cls = self.storages[choice.type]
        self._check_available(cls)
        return cls(data_dir, cls.parse_options(choice.options, "daemon.storage"))

    def make_transport(self, choice: PluginChoice) -> Transport:
        cls = self.transports[choice.type]
        self._check_available(cls)
        return cls(cls.parse_options(choice.options, f"daemon.transports.{choice.type}"))

    def make_picker(self, name: str) -> PiecePicker:
        cls = self.pickers[name]
        return cls(cls.parse_options({}, "daemon.piece_picker"))

    def make_strategy(self, name: str) -> Strategy:
        cls = self.strategies[name]
        return cls(cls.parse_options({}, "scheduler.strategy"))

    @staticmethod
    def _check_available(plugin: type[Plugin]) -> None:
        reason = plugin.available()
        if reason:
            raise Unavailable(f"plugin {plugin.name!r} cannot run here: {reason}")

    def piece_verified(self, task_id: str, number: int, length: int, parent_id: str, traffic_type: int) -> None:
        self.pm.hook.damselfly_piece_verified(
            task_id=task_id, number=number, length=length, parent_id=parent_id, traffic_type=traffic_type
        )

    def piece_failed(self, task_id: str, number: int, parent_id: str, reason: str) -> None:
        self.pm.hook.damselfly_piece_failed(task_id=task_id, number=number, parent_id=parent_id, reason=reason)

    def task_finished(self, task_id: str, url: str, content_length: int, peer_bytes: int, source_bytes: int) -> None:
        self.pm.hook.damselfly_task_finished(
            task_id=task_id, url=url, content_length=content_length, peer_bytes=peer_bytes, source_bytes=source_bytes
        )


def _register_modules(pm: pluggy.PluginManager, modules: Iterable[str], blocked: set[str]) -> None:
    for name in modules:
        if name in blocked or pm.is_blocked(name):
            logger.debug("plugin module {} is blocked", name)
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise InvalidArgument(f"cannot import plugin module {name!r}: {exc}") from None
        if pm.get_plugin(name) is None:
            pm.register(module, name=name)


def build_plugins(settings: Settings) -> Plugins:
    """A fresh plugin manager for these settings; never a module global."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(settings.plugins.block)
    for name in blocked:
        pm.set_blocked(name)
    _register_modules(pm, BUILTIN_PLUGINS, blocked)
    if settings.plugins.autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    _register_modules(pm, settings.plugins.load, blocked)
    pm.check_pending()
    return Plugins(pm, settings)
