"""Stand-ins for origins that cannot run here: a Hugging Face hub and an HDFS namenode (WebHDFS).

Neither the hub nor HDFS is reachable or installable where damselfly is built and
tested, so the ``hf`` and ``hdfs`` source plugins are tested against these small
servers. Each speaks the same REST calls as the real one, for the part the plugins
use, serves files from a directory and counts the requests it answers:

- ``FakeHub``: ``/[datasets/]owner/repo/resolve/REV/PATH`` (a 302 to a CDN path
  that answers ranged GETs, as the hub does for large files), and
  ``/api/{models,datasets}/owner/repo/tree/REV[/PATH]`` (paginated with a ``Link``
  header); repositories listed in ``private`` want ``Authorization: Bearer TOKEN``.
  Files live under ``root/{models,datasets}/owner/repo/REV/PATH``.
- ``FakeWebHdfs``: ``/webhdfs/v1/PATH?op=GETFILESTATUS|LISTSTATUS|OPEN``, OPEN
  redirected (307) to a "datanode" path; with ``delegation_token`` set, every call
  without ``delegation=TOKEN`` is refused as HDFS refuses it.

Both run on their own event loop in a thread, so sync and async tests can use them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web


class _Threaded:
    """An aiohttp app on 127.0.0.1, port 0, on its own loop in a daemon thread."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: Counter[str] = Counter()  # "METHOD path" -> count
        self.bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> _Threaded:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, needle: str = "") -> int:
        return sum(n for k, n in self.requests.items() if needle in k)

    def _serve_file(self, request: web.Request, path: Path) -> web.StreamResponse:
        """The file, ranged or whole (aiohttp's FileResponse), counting the bytes a GET sends."""
        if request.method == "GET":
            size = path.stat().st_size
            ranged = request.http_range if request.headers.get("Range") else slice(0, size)
            start = ranged.start or 0
            stop = min(ranged.stop if ranged.stop is not None else size, size)
            self.bytes_sent += max(0, stop - start)
        return web.FileResponse(path)


class FakeHub(_Threaded):
    def __init__(self, root: Path, private: dict[str, str] | None = None, page_size: int = 1000):
        super().__init__()
        self.root = root
        self.private = dict(private or {})  # "owner/repo" -> the token it wants
        self.page_size = page_size

    def add(self, repo: str, path: str, data: bytes, revision: str = "main", repo_type: str = "models") -> Path:
        target = self.root / repo_type / repo / revision / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def _authorized(self, request: web.Request, repo: str) -> bool:
        want = self.private.get(repo)
        return want is None or request.headers.get("Authorization") == f"Bearer {want}"

    def app(self) -> web.Application:
        app = web.Application()
        for prefix, kind in (("", "models"), ("/datasets", "datasets")):
            app.router.add_route("*", prefix + "/{owner}/{repo}/resolve/{rev}/{path:.+}", self._resolve(kind))
            app.router.add_get(f"/api/{kind}/{{owner}}/{{repo}}/tree/{{rev}}{{path:(/.*)?}}", self._tree(kind))
        app.router.add_route("*", "/cdn/{kind}/{owner}/{repo}/{rev}/{path:.+}", self._cdn)
        return app

    def _resolve(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            m = request.match_info
            repo = f"{m['owner']}/{m['repo']}"
            self.requests[f"{request.method} resolve {repo}/{m['path']}"] += 1
            if not self._authorized(request, repo):
                return web.json_response({"error": "Repository not found or access denied"}, status=401)
            if not (self.root / kind / repo / m["rev"] / m["path"]).is_file():
                return web.json_response({"error": "Entry not found"}, status=404)
            cdn = f"/cdn/{kind}/{repo}/{quote(m['rev'], safe='')}/{quote(m['path'])}"
            # returned, not raised: a raised HTTPFound's traceback ties the request (and its
            # transport) into a cycle that the garbage collector may reach while it is closing
            return web.Response(status=302, headers={"Location": cdn})

        return handler

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        self.requests[f"{request.method} cdn {m['owner']}/{m['repo']}/{m['path']}"] += 1
        path = self.root / m["kind"] / m["owner"] / m["repo"] / m["rev"] / m["path"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return self._serve_file(request, path)

    def _tree(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            m = request.match_info
            repo = f"{m['owner']}/{m['repo']}"
            self.requests[f"GET tree {repo}{m['path']}"] += 1
            if not self._authorized(request, repo):
                return web.json_response({"error": "Repository not found or access denied"}, status=401)
            top = self.root / kind / repo / m["rev"]
            where = top / m["path"].lstrip("/")
            if not where.is_dir():
                return web.json_response({"error": "not found"}, status=404)
            walk = where.rglob("*") if request.query.get("recursive") == "true" else where.iterdir()
            items = [
                {
                    "type": "directory" if p.is_dir() else "file",
                    "path": str(p.relative_to(top)),
                    "size": p.stat().st_size,
                }
                for p in sorted(walk)
            ]
            start = int(request.query.get("cursor", "0"))
            page = items[start : start + self.page_size]
            headers = {}
            if start + self.page_size < len(items):
                nxt = request.url.update_query(cursor=str(start + self.page_size))
                headers["Link"] = f'<{nxt}>; rel="next"'
            return web.json_response(page, headers=headers)

        return handler


class FakeWebHdfs(_Threaded):
    def __init__(self, root: Path, delegation_token: str = ""):
        super().__init__()
        self.root = root
        self.delegation_token = delegation_token

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/webhdfs/v1{path:/.*}", self._namenode)
        app.router.add_get("/datanode{path:/.*}", self._datanode)
        return app

    @staticmethod
    def _remote_exception(status: int, kind: str, message: str) -> web.Response:
        body = {"RemoteException": {"exception": kind, "javaClassName": f"java.io.{kind}", "message": message}}
        return web.json_response(body, status=status)

    def _status(self, path: Path, suffix: str) -> dict[str, Any]:
        return {
            "pathSuffix": suffix,
            "type": "DIRECTORY" if path.is_dir() else "FILE",
            "length": 0 if path.is_dir() else path.stat().st_size,
            "modificationTime": int(path.stat().st_mtime * 1000),
            "owner": "hdfs",
            "group": "supergroup",
            "permission": "755",
            "replication": 0 if path.is_dir() else 3,
            "blockSize": 0 if path.is_dir() else 134217728,
        }

    async def _namenode(self, request: web.Request) -> web.StreamResponse:
        op = request.query.get("op", "")
        hdfs_path = request.match_info["path"]
        self.requests[f"{op} {hdfs_path}"] += 1
        if self.delegation_token and request.query.get("delegation") != self.delegation_token:
            return self._remote_exception(403, "SecurityException", "Failed to obtain user group information")
        local = self.root / hdfs_path.lstrip("/")
        if not local.exists():
            return self._remote_exception(404, "FileNotFoundException", f"File does not exist: {hdfs_path}")
        if op == "GETFILESTATUS":
            return web.json_response({"FileStatus": self._status(local, "")})
        if op == "LISTSTATUS":
            children = sorted(local.iterdir()) if local.is_dir() else [local]
            statuses = [self._status(c, c.name if local.is_dir() else "") for c in children]
            return web.json_response({"FileStatuses": {"FileStatus": statuses}})
        if op == "OPEN":
            query = {k: v for k, v in request.query.items() if k in ("offset", "length")}
            target = request.url.with_path("/datanode" + hdfs_path).with_query(query)
            raise web.HTTPTemporaryRedirect(str(target))
        return self._remote_exception(400, "IllegalArgumentException", f"Invalid value for webhdfs parameter op: {op}")

    async def _datanode(self, request: web.Request) -> web.StreamResponse:
        hdfs_path = request.match_info["path"]
        self.requests[f"DATANODE {hdfs_path}"] += 1
        local = self.root / hdfs_path.lstrip("/")
        size = local.stat().st_size
        offset = int(request.query.get("offset", "0"))
        length = int(request.query.get("length", str(size - offset)))
        with open(local, "rb") as f:
            f.seek(offset)
            body = f.read(max(0, min(length, size - offset)))
        self.bytes_sent += len(body)
        return web.Response(body=body, content_type="application/octet-stream")
