"""The fluid simulator (benchmarks/simulate.py) runs the lab's profiles and keeps to the bound."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
SIMULATE = Path(__file__).resolve().parents[2] / "benchmarks" / "simulate.py"


def simulate(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SIMULATE), "--hosts", "8", "--size", "32MiB", "--piece-length", "1MiB", "--json", *args],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_swarm_profile_reads_the_origin_once_and_beats_the_default_dag_without_beating_the_bound():
    swarm = simulate("--strategy", "swarm")
    default = simulate("--strategy", "dragonfly")
    out_of_box = simulate("--strategy", "out-of-box")
    for run in (swarm, default, out_of_box):
        assert run["origin_ratio"] == 1.0
        # no host can download faster than its link: at most the payload share of it
        assert 1.0 < run["p50_ratio"] <= run["p90_ratio"] <= run["max_ratio"]
    assert swarm["p50_ratio"] < default["p50_ratio"]
    assert out_of_box["p50_ratio"] < default["p50_ratio"]  # the defaults are the mesh, not the DAG
    held_back = simulate("--strategy", "swarm", "--share-concurrent", "1")
    assert held_back["origin_ratio"] == 1.0 and held_back["p50_ratio"] != swarm["p50_ratio"]  # the setting is modelled
