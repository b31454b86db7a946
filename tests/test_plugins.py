"""Plugin registration: built-ins like third parties, entry points, blocking, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from damselfly import hookimpl
from damselfly.config import load_settings
from damselfly.contracts import Source, SourceInfo
from damselfly.core.errors import InvalidArgument
from damselfly.plugin_manager import BUILTIN_PLUGINS, build_plugins

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_are_registered_with_their_kind_and_origin():
    plugins = build_plugins(load_settings())
    rows = {(i.name, i.kind): i.origin for i in plugins.info()}
    for key in [
        ("http", "source"),
        ("file", "source"),
        ("tcp", "transport"),
        ("disk", "storage"),
        ("memory", "storage"),
        ("dragonfly", "strategy"),
        ("swarm", "strategy"),
        ("random", "strategy"),
    ]:
        assert rows[key] == "builtin"
    assert plugins.source_for("https://x/y").name == "http"


def test_unknown_scheme_and_name_are_clear_errors():
    plugins = build_plugins(load_settings())
    with pytest.raises(InvalidArgument, match="no source plugin handles gopher://"):
        plugins.source_for("gopher://x")
    with pytest.raises(InvalidArgument, match="no storage plugin named 'tape'"):
        plugins.storages["tape"]


def test_block_by_plugin_name_and_module():
    s = load_settings(plugins={"block": ["random", "damselfly.plugins.storage.memory"]})
    plugins = build_plugins(s)
    assert "random" not in plugins.strategies
    assert "memory" not in plugins.storages
    assert "dragonfly" in plugins.strategies


class Dup(Source):
    name: ClassVar[str] = "http"
    schemes: ClassVar[tuple[str, ...]] = ("dup",)

    async def stat(self, url, headers):
        return SourceInfo(0)

    async def read(self, url, offset, length, headers):
        yield b""


@hookimpl
def damselfly_add_sources(registry):
    registry.add(Dup)


def test_duplicate_names_are_an_error():
    s = load_settings(plugins={"load": ["tests.test_plugins"]})
    with pytest.raises(InvalidArgument, match="two source plugins are named 'http'"):
        build_plugins(s)


def test_plugin_options_are_validated_by_the_plugin():
    plugins = build_plugins(load_settings(daemon={"storage": {"type": "memory", "capacity": "lots"}}))
    with pytest.raises(InvalidArgument, match=r"daemon\.storage\.capacity"):
        plugins.make_storage(plugins.settings.daemon.storage, "/tmp")


def test_builtin_list_matches_the_plugin_modules():
    """Every module under plugins/ with hook implementations is registered (helpers have none)."""
    mods = {
        f"damselfly.plugins.{p.parent.name}.{p.stem}"
        for p in (ROOT / "damselfly" / "plugins").glob("*/*.py")
        if "@hookimpl" in p.read_text()
    }
    assert mods == set(BUILTIN_PLUGINS)


@pytest.mark.timeout(300)
def test_third_party_package_is_found_through_its_entry_point(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "damselfly-hello"),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    hello = [r for r in rows if r["origin"] == "entry point damselfly-hello 0.1.0"]
    assert sorted(hello, key=lambda r: r["name"]) == [
        {"name": "hello", "kind": "source", "origin": "entry point damselfly-hello 0.1.0", "unavailable": None},
        {"name": "idle-first", "kind": "strategy", "origin": "entry point damselfly-hello 0.1.0", "unavailable": None},
    ]

    env["DAMSELFLY_PLUGINS__AUTOLOAD"] = "false"
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    assert not {"hello", "idle-first"} & {json.loads(line)["name"] for line in out.stdout.splitlines()}

    env["DAMSELFLY_PLUGINS__AUTOLOAD"] = "true"
    env["DAMSELFLY_PLUGINS__BLOCK"] = '["hello"]'  # the entry point's name: the whole package
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    assert not {"hello", "idle-first"} & {json.loads(line)["name"] for line in out.stdout.splitlines()}


def test_each_registry_hook_adds_its_kind():
    """damselfly_add_sources, _transports, _storages, _strategies and damselfly_add_piece_pickers."""
    plugins = build_plugins(load_settings(plugins={"load": ["tests.helpers.toys"]}))
    rows = {i.name: i for i in plugins.info()}
    assert rows["toy-source"].kind == "source" and plugins.source_for("toy://x").name == "toy-source"
    assert rows["toy-transport"].kind == "transport"
    assert rows["toy-transport"].unavailable == "needs a toy network card"
    assert rows["toy-storage"].kind == "storage" and rows["toy-strategy"].kind == "strategy"
    assert rows["toy-strategy"].origin == "module tests.helpers.toys"
    assert rows["toy-picker"].kind == "piece picker"
    assert plugins.make_picker("toy-picker").order({1, 3, 2}, {}) == [3, 2, 1]
    from damselfly.config import PluginChoice
    from damselfly.core.errors import Unavailable

    with pytest.raises(Unavailable, match="toy network card"):
        plugins.make_transport(PluginChoice(type="toy-transport"))


def test_registry_rejects_what_is_not_a_plugin_class():
    plugins = build_plugins(load_settings())
    with pytest.raises(TypeError, match="not a Source"):
        plugins.sources.add(int)  # type: ignore[arg-type]
