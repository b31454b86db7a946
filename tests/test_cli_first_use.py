"""The first five minutes: a wrong url or scheme is said before any daemon is looked for, in one line."""

import pytest
from click.testing import CliRunner

from damselfly.cli import cli


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("notaurl", "'notaurl' is not a url: expected SCHEME://"),
        ("gopher://host/file", "no source plugin handles gopher:// urls"),
    ],
)
def test_get_names_a_bad_url_before_it_looks_for_a_daemon(tmp_path, url, says):
    socket = tmp_path / "no-daemon.sock"
    result = CliRunner().invoke(cli, ["get", url, "-O", str(tmp_path / "out"), "--socket", str(socket)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("damselfly: error: ") and says in lines[0]
    assert "https" in lines[0] and "file" in lines[0]  # it names the schemes that work
    assert "daemon" not in lines[0]
    assert not (tmp_path / "out").exists()


def test_get_without_a_daemon_says_how_to_start_one(tmp_path):
    socket = tmp_path / "no-daemon.sock"
    result = CliRunner().invoke(
        cli, ["get", "https://example.com/f", "-O", str(tmp_path / "out"), "--socket", str(socket)]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"damselfly: error: no daemon socket at {socket} (is `damselfly daemon` running?)"]


def test_demo_limits_its_origin_by_default():
    params = {p.name: p for p in cli.commands["demo"].params}
    assert params["origin_rate"].default == "50MB/s"
