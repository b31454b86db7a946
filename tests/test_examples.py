"""The shipped examples run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}


@pytest.mark.timeout(120)
def test_embed_example_runs_a_swarm_in_one_process():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed.py")],
        capture_output=True,
        text=True,
        timeout=110,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "origin sent 33554432 bytes for a 33554432-byte file" in out.stdout
    # each peer's bytes came from its parents and its share of the one source read
    lines = [ln for ln in out.stdout.splitlines() if "bytes in" in ln]
    assert len(lines) == 2 and all(ln.split()[1] == "33554432" for ln in lines)


def test_example_configs_are_valid(tmp_path):
    from damselfly.config import load_settings

    d = load_settings(ROOT / "examples" / "daemon.yaml")
    assert d.daemon.piece_port == 4005 and d.host.max_tx_bandwidth == 1_000_000_000
    s = load_settings(ROOT / "examples" / "scheduler.yaml")
    assert s.scheduler.port == 8002


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_demo_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", "demo", "--peers", "3", "--size", "24MiB", "--json"],
        capture_output=True,
        text=True,
        timeout=230,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["origin_bytes"] == r["file_size"] == 24 << 20
    assert r["all_digests_ok"] is True
    assert r["direct_origin_bytes"] == 3 * r["file_size"]
    # what the peers did not read as their share of the one source read came from each other
    assert r["p2p_bytes"] + r["peer_source_bytes"] == 3 * r["file_size"] and r["p2p_bytes"] > r["file_size"]
    assert r["allow_loopback"] is True and r["tls"] is False  # every part on loopback: the demo allows it
    for key in ("peers", "origin_requests", "back_to_source_bytes", "p2p_seconds", "direct_seconds"):
        assert key in r


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_demo_tls_json(tmp_path):
    """`damselfly demo --tls --json`: mutual TLS everywhere with a fresh CA, the origin read once."""
    args = ["demo", "--tls", "--peers", "3", "--size", "16MiB", "--json", "--dir", str(tmp_path / "run")]
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", *args],
        capture_output=True,
        text=True,
        timeout=230,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["tls"] is True
    assert r["origin_bytes"] == r["file_size"] == 16 << 20
    assert r["all_digests_ok"] is True
    assert r["p2p_bytes"] + r["peer_source_bytes"] == 3 * r["file_size"] and r["p2p_bytes"] > r["file_size"]
    assert r["direct_origin_bytes"] == 3 * r["file_size"]
    cluster = tmp_path / "run" / "cluster"
    seed_config = (cluster / "config" / "seed.yaml").read_text()
    assert "allow_loopback: true" in seed_config
    assert str(cluster / "tls" / "seed.pem") in seed_config and "ca-key.pem" not in seed_config


def _install_and_run_kit(tmp_path, package: Path, row: dict) -> None:
    """pip-install an example package into a target dir; it must show up through its entry point and pass its kit."""
    target = tmp_path / "site"
    pip = ["pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(package)]
    subprocess.run([sys.executable, "-m", *pip], check=True, capture_output=True)
    env = {**clean_env(), "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "damselfly", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    assert row in [json.loads(line) for line in out.stdout.splitlines()]
    pytest_args = ["-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(package), str(package / "tests")]
    kit = subprocess.run([sys.executable, *pytest_args, "-v"], env=env, capture_output=True, text=True, timeout=280)
    assert kit.returncode == 0, kit.stdout[-3000:]
    listed = subprocess.run(
        [sys.executable, *pytest_args, "-q", "--collect-only"], env=env, capture_output=True, text=True, timeout=120
    )
    collected = [line for line in listed.stdout.splitlines() if "::" in line]
    ran = [line for line in kit.stdout.splitlines() if re.search(r"::\S+ (PASSED|SKIPPED)", line)]
    assert collected and len(ran) == len(collected), kit.stdout[-3000:]  # every test of the kit ran


@pytest.mark.timeout(300)
def test_unix_transport_package_installs_and_passes_the_conformance_kit(tmp_path):
    """examples/damselfly-unix: found through its entry point, and the transport kit passes against it."""
    row = {"name": "unix", "kind": "transport", "origin": "entry point damselfly-unix 0.1.0", "unavailable": None}
    _install_and_run_kit(tmp_path, ROOT / "examples" / "damselfly-unix", row)


@pytest.mark.timeout(300)
def test_sqlite_storage_package_installs_and_passes_the_storage_kit(tmp_path):
    """examples/damselfly-sqlite: a third-party storage found through its entry point; the storage kit passes."""
    row = {"name": "sqlite", "kind": "storage", "origin": "entry point damselfly-sqlite 0.1.0", "unavailable": None}
    _install_and_run_kit(tmp_path, ROOT / "examples" / "damselfly-sqlite", row)


@pytest.mark.timeout(300)
def test_hello_package_installs_and_passes_the_source_and_strategy_kits(tmp_path):
    """examples/damselfly-hello: a source and a strategy found through their entry points; both kits pass."""
    row = {"name": "idle-first", "kind": "strategy", "origin": "entry point damselfly-hello 0.1.0", "unavailable": None}
    _install_and_run_kit(tmp_path, ROOT / "examples" / "damselfly-hello", row)
