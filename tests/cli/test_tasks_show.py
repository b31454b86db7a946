"""``damselfly tasks show ID``: the piece timeline of a download, as a table or JSON lines."""

import asyncio
import json
import os

import pytest
from aiohttp import web
from click.testing import CliRunner

from damselfly.cli import cli
from damselfly.sdk.client import Client
from tests.helpers.daemons import daemon
from tests.helpers.web import http_server

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CONTENT = os.urandom(3 * MiB + 17)  # four pieces of 1 MiB, the last one short


async def _origin(request: web.Request) -> web.StreamResponse:
    return web.Response(body=CONTENT)


async def _show(*args: str):
    return await asyncio.to_thread(CliRunner().invoke, cli, ["tasks", "show", *args])


async def test_tasks_show_gives_a_finished_download_one_stored_event_per_piece(tmp_path):
    async with http_server(_origin) as base, daemon(tmp_path) as d:
        socket = str(d.settings.socket_path)
        async with Client(socket) as c:
            result = await c.download(f"{base}/model.bin", tmp_path / "out", piece_length=MiB)
        as_json = await _show(result.task_id, "--json", "--socket", socket)
        table = await _show(result.task_id, "--socket", socket)
        unknown = await _show("f" * 64, "--socket", socket)
    assert as_json.exit_code == 0, as_json.output
    events = [json.loads(line) for line in as_json.output.splitlines()]
    stored = [e for e in events if e["kind"] == "stored"]
    assert sorted(e["piece"] for e in stored) == [0, 1, 2, 3]
    assert sum(e["length"] for e in stored) == len(CONTENT)
    assert [e["kind"] for e in events if e["kind"] != "stored"] == ["back_to_source"]  # no scheduler here
    assert table.exit_code == 0, table.output
    rows = table.output.splitlines()
    assert rows[0].split()[:4] == ["+seconds", "event", "piece", "parent"]
    assert len(rows) == 1 + len(events) and sum(" stored " in r for r in rows) == 4
    assert unknown.exit_code == 1 and "no download of task" in unknown.output
