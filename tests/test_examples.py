"""The shipped examples run."""

import json
import os
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
    assert out.stdout.count("source 0)") == 2


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
    assert r["p2p_bytes"] == 3 * r["file_size"]
    for key in ("peers", "origin_requests", "back_to_source_bytes", "p2p_seconds", "direct_seconds"):
        assert key in r
