"""A real S3 API server (moto_server) for tests, and its request log.

``.ci/run`` starts one ``moto_server`` for the whole run and exports its endpoint
and log file (``DAMSELFLY_TEST_S3_ENDPOINT``, ``DAMSELFLY_TEST_S3_LOG``); without
them (a developer's ``pytest``) the fixture starts its own on a free port. Tests
make their own bucket, so they share the server and count only their own
requests in the log.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "damselfly-test"
SECRET_KEY = "damselfly-test-secret"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some status lines, depending on the terminal
_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


@dataclass
class S3Server:
    endpoint: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    @property
    def object_storage(self) -> dict[str, str]:
        """The same as Dragonfly's ObjectStorage options (for Client.download / the s3 source)."""
        return {"endpoint": self.endpoint, "access_key_id": ACCESS_KEY, "access_key_secret": SECRET_KEY}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def requests(self, bucket: str) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the server logged for ``bucket``."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _LINE.search(_ANSI.sub("", line))
            if m and (m["path"] == f"/{bucket}" or m["path"].startswith((f"/{bucket}/", f"/{bucket}?"))):
                out.append((m["method"], m["path"], int(m["status"])))
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(endpoint: str, process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server at {endpoint} did not answer in {timeout}s") from None
            time.sleep(0.1)


def s3_server(tmp_dir: Path) -> Iterator[S3Server]:
    """The run's moto_server, or one started here (stopped afterwards)."""
    endpoint = os.environ.get("DAMSELFLY_TEST_S3_ENDPOINT")
    log = os.environ.get("DAMSELFLY_TEST_S3_LOG")
    if endpoint and log:
        _wait(endpoint, None)
        yield S3Server(endpoint, Path(log))
        return
    exe = shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    log_path = tmp_dir / "moto.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}", log_path, proc)
    try:
        _wait(server.endpoint, proc)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
