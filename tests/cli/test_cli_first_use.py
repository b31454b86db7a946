"""The first five minutes: a wrong url or scheme is said before any daemon is looked for, in one
line; with no daemon running, ``get`` starts one inside itself for the download and leaves
nothing behind."""

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from damselfly.cli import cli
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(60)

CONTENT = os.urandom(3 * 1024 * 1024 + 17)  # several pieces, the last one short
NOTE = "damselfly: no daemon was running at {}: an embedded one served this download and stopped"


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
    socket = tmp_path / "no-daemon.sock"  # a socket named on the command line is never replaced
    result = CliRunner().invoke(
        cli, ["get", "https://example.com/f", "-O", str(tmp_path / "out"), "--socket", str(socket)]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"damselfly: error: no daemon socket at {socket} (is `damselfly daemon` running?)"]


def test_no_embedded_keeps_the_hint(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    result = CliRunner().invoke(
        cli,
        ["get", "https://example.com/f", "-O", str(tmp_path / "out"), "--no-embedded"],
        env={"DAMSELFLY_DAEMON__DATA_DIR": str(data)},
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"damselfly: error: no daemon socket at {data / 'dfdaemon.sock'} (is `damselfly daemon` running?)"]
    assert list(data.iterdir()) == [] and not (tmp_path / "out").exists()


async def _origin(request: web.Request) -> web.StreamResponse:
    if request.path != "/model.bin":
        raise web.HTTPNotFound()
    return web.Response(body=CONTENT)


async def _get(args: list[str], data: Path) -> Result:
    """``damselfly get ARGS`` in this process, with no daemon at DATA's socket, off the event
    loop that serves the origin."""
    env = {"DAMSELFLY_DAEMON__DATA_DIR": str(data)}
    return await asyncio.to_thread(CliRunner().invoke, cli, ["get", *args], env=env)


@pytest.mark.parametrize("data_dir", ["exists", "missing"])
async def test_get_without_a_daemon_serves_the_download_from_an_embedded_one(tmp_path, monkeypatch, data_dir):
    data = tmp_path / "data"
    if data_dir == "exists":
        data.mkdir()  # the embedded daemon's directory goes inside it, then away
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # else it goes in the system's temp dir
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    async with http_server(_origin) as base:
        result = await _get([f"{base}/model.bin", "-O", str(out_dir / "model.bin")], data)
    assert result.exit_code == 0, result.output
    assert (out_dir / "model.bin").read_bytes() == CONTENT
    assert os.listdir(out_dir) == ["model.bin"]  # the temp file was renamed into place
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(NOTE.format(data / "dfdaemon.sock")) and "`damselfly daemon`" in lines[-1]
    assert len(lines) == 2  # the summary, then the note
    # no daemon, socket or directory is left behind (the config's data dir is not made for it)
    assert list(temp.iterdir()) == []
    assert (list(data.iterdir()) == []) if data_dir == "exists" else not data.exists()


async def test_no_progress_leaves_out_the_note(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    async with http_server(_origin) as base:
        result = await _get([f"{base}/model.bin", "-O", str(tmp_path / "model.bin"), "--no-progress"], data)
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert (tmp_path / "model.bin").read_bytes() == CONTENT
    assert list(data.iterdir()) == []


async def test_a_failed_download_through_an_embedded_daemon_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    async with http_server(_origin) as base:
        result = await _get([f"{base}/missing.bin", "-O", str(out_dir / "missing.bin")], data)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("damselfly: error: ") and "404" in lines[0], result.output
    assert list(out_dir.iterdir()) == [] and list(data.iterdir()) == []


@pytest.mark.parametrize(
    ("sig", "code", "says"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
async def test_an_interrupted_get_stops_its_embedded_daemon(tmp_path, sig, code, says):
    """Ctrl-C (or SIGTERM) in the middle of a download: the process ends, and so does everything it started."""
    data = tmp_path / "data"
    data.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    reading = asyncio.Event()
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(CONTENT))})
        await resp.prepare(request)
        if request.method == "GET":
            await resp.write(CONTENT[:4096])
            reading.set()
            await asyncio.wait_for(release.wait(), 30)
        return resp

    async with http_server(stalls) as base:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "damselfly",
            "get",
            f"{base}/model.bin",
            "-O",
            str(out_dir / "model.bin"),
            env={**os.environ, "DAMSELFLY_DAEMON__DATA_DIR": str(data)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(reading.wait(), 30)
            proc.send_signal(sig)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            release.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == code, err
    assert err.decode().strip().splitlines()[-1] == f"damselfly: error: {says}"
    assert list(out_dir.iterdir()) == [] and list(data.iterdir()) == []


def test_demo_limits_its_origin_by_default():
    params = {p.name: p for p in cli.commands["demo"].params}
    assert params["origin_rate"].default == "50MB/s"
