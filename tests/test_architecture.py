"""The house's rules, checked on every run: the layering contracts (import-linter, in
pyproject.toml), strict typing of what plugins build on (mypy), the docs build, and rooms
small enough to read."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LONGEST_MODULE = 700
LONGEST_README = 250

pytestmark = pytest.mark.timeout(180)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=170)


def test_the_layering_contracts_hold():
    """core is pure, plugins never import the services, the scheduler and the daemon never import
    each other, and no room imports another that imports it back."""
    proc = run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout


def test_the_core_the_contracts_the_hooks_and_the_kits_type_check_strictly(tmp_path):
    proc = run(sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_docs_build_with_no_warnings(tmp_path):
    proc = run(str(BIN / "mkdocs"), "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_no_module_is_longer_than_a_newcomer_can_hold():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "damselfly").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > LONGEST_MODULE
    }
    assert long == {}


def test_the_readme_keeps_to_the_pitch_and_leaves_the_reference_to_the_docs():
    assert len((ROOT / "README.md").read_text().splitlines()) <= LONGEST_README
