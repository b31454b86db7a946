"""Config: defaults, YAML, env, constructor overrides, and one-line errors naming the field."""

import json

import pytest
from click.testing import CliRunner

from damselfly.cli import cli
from damselfly.config import load_settings
from damselfly.core.errors import InvalidArgument


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("DAMSELFLY_"):
            monkeypatch.delenv(k)


def test_defaults_are_documented_and_sane():
    s = load_settings()
    assert s.daemon.concurrent_pieces == 6  # chosen by role: a peer
    assert load_settings(daemon={"seed": True}).daemon.concurrent_pieces == 1  # a seed's own download first
    assert load_settings(daemon={"seed": True, "concurrent_pieces": 4}).daemon.concurrent_pieces == 4
    # the swarm's settings are the defaults: no user has to know them (issue 26)
    assert (s.scheduler.strategy, s.scheduler.source_shares, s.daemon.piece_picker) == ("swarm", True, "rarest-first")
    assert s.daemon.source_reads(8 << 20) == 1 and s.daemon.source_reads(1 << 30) == 4
    assert s.scheduler.candidate_parent_limit == 3
    assert s.scheduler.filter_parent_limit == 15
    assert s.daemon.storage.type == "disk"
    for section in (s.daemon, s.scheduler, s.host, s.plugins):
        for name, field in type(section).model_fields.items():
            assert field.description, f"{type(section).__name__}.{name} has no description"


def test_env_nested_and_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("daemon:\n  concurrent_pieces: 4\n  storage: {type: memory, capacity: 64MiB}\nhost:\n  idc: idc-a\n")
    monkeypatch.setenv("DAMSELFLY_CONFIG", str(cfg))
    monkeypatch.setenv("DAMSELFLY_DAEMON__CONCURRENT_PIECES", "7")
    monkeypatch.setenv("DAMSELFLY_HOST__MAX_TX_BANDWIDTH", "100MB/s")
    s = load_settings()
    assert s.daemon.concurrent_pieces == 7  # env beats YAML
    assert s.host.idc == "idc-a"
    assert s.host.max_tx_bandwidth == 100_000_000
    assert s.daemon.storage.type == "memory" and s.daemon.storage.options == {"capacity": "64MiB"}
    s2 = load_settings(daemon={"concurrent_pieces": 2})
    assert s2.daemon.concurrent_pieces == 2  # constructor beats env


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.daemon.seed = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("DAMSELFLY_DAEMON__CONCURRENT_PIECES", "lots", "daemon.concurrent_pieces"),
        ("DAMSELFLY_DAEMON__UPLOAD_PORT", "70000", "daemon.upload_port"),
        ("DAMSELFLY_HOST__MAX_TX_BANDWIDTH", "fast", "host.max_tx_bandwidth"),
    ],
)
def test_bad_values_name_the_field(monkeypatch, env, value, field):
    monkeypatch.setenv(env, value)
    with pytest.raises(InvalidArgument) as err:
        load_settings()
    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("daemon:\n  concurrent_piecez: 4\n")
    with pytest.raises(InvalidArgument, match=r"daemon\.concurrent_piecez"):
        load_settings(cfg)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("daemon: [unclosed\n")
    with pytest.raises(InvalidArgument, match="invalid config"):
        load_settings(cfg)


def test_config_show_prints_the_effective_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DAMSELFLY_SCHEDULER__STRATEGY", "random")
    result = CliRunner().invoke(cli, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["scheduler"]["strategy"] == "random"
    assert data["daemon"]["transports"] == [{"type": "tcp"}]


def test_cli_reports_a_bad_config_in_one_line(monkeypatch):
    monkeypatch.setenv("DAMSELFLY_DAEMON__CONCURRENT_PIECES", "-1")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln]
    assert len(lines) == 1 and "daemon.concurrent_pieces" in lines[0]


def test_the_configuration_page_holds_the_current_config_reference():
    from pathlib import Path

    from damselfly.config import reference_markdown

    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page, "regenerate docs/configuration.md's table with `damselfly config reference`"
