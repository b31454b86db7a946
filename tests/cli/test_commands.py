"""The command groups as front ends: what `get` hands the daemon, where -r puts each entry,
and what `runtime-config` prints (the domain logic they call is tested in its own room)."""

import pytest
from click.testing import CliRunner

from damselfly.cli import cli
from damselfly.cli.get import relative
from damselfly.core.errors import InvalidArgument
from damselfly.sdk.client import Client


def test_get_hands_the_source_flags_to_the_daemon_as_the_downloads_messages(tmp_path, monkeypatch):
    seen = {}

    async def download(self, url, output, **kwargs):
        seen.update(kwargs, url=url)

    monkeypatch.setattr(Client, "download", download)
    args = ["get", "https://example.com/f", "-O", str(tmp_path / "f"), "--socket", str(tmp_path / "s.sock")]
    flags = ["--storage-region", "eu", "--storage-access-key-id", "AK", "--hf-revision", "v1"]
    result = CliRunner().invoke(cli, [*args, "--no-progress", *flags])
    assert result.exit_code == 0, result.output
    assert seen["url"] == "https://example.com/f"
    assert seen["source_options"] == {
        "object_storage": {"region": "eu", "access_key_id": "AK"},
        "hugging_face": {"revision": "v1"},
    }


def test_get_without_source_flags_sends_no_source_messages(tmp_path, monkeypatch):
    seen = {}

    async def download(self, url, output, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(Client, "download", download)
    args = ["get", "https://example.com/f", "-O", str(tmp_path / "f"), "--socket", str(tmp_path / "s.sock")]
    result = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen["source_options"] == {}


@pytest.mark.parametrize(
    ("base", "url", "where"),
    [
        ("s3://bucket/data/", "s3://bucket/data/a/b.csv", "a/b.csv"),
        ("hdfs://nn:9870/data", "hdfs://nn:9870/data/./x", "x"),
        ("oci://reg/team/app:v1", "oci://reg/team/app@sha256:abc", "sha256:abc"),
    ],
)
def test_a_recursive_entry_goes_under_the_output_directory(base, url, where):
    assert relative(base, url) == where


@pytest.mark.parametrize("url", ["s3://bucket/data/../etc/passwd", "s3://bucket/data/"])
def test_a_recursive_entry_that_would_leave_the_output_directory_is_refused(url):
    with pytest.raises(InvalidArgument, match="does not lie under"):
        relative("s3://bucket/data/", url)


def test_runtime_config_prints_containerds_hosts_toml_for_the_registry():
    result = CliRunner().invoke(cli, ["runtime-config", "containerd", "--proxy", "127.0.0.1:4001"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# /etc/containerd/certs.d/docker.io/hosts.toml")
    assert 'server = "https://registry-1.docker.io"' in result.output
    assert 'X-Dragonfly-Registry = ["https://registry-1.docker.io"]' in result.output


def test_runtime_config_names_a_plain_http_registry_insecure_for_podman():
    result = CliRunner().invoke(
        cli, ["runtime-config", "podman", "--proxy", "127.0.0.1:4001", "--registry", "http://127.0.0.1:5000"]
    )
    assert result.exit_code == 0, result.output
    assert 'prefix = "127.0.0.1:5000"\nlocation = "127.0.0.1:5000"\ninsecure = true\n' in result.output
    assert '[[registry.mirror]]\nlocation = "127.0.0.1:4001"' in result.output
