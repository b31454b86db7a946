"""``p2p::`` URLs for fsspec: data tools read origins through the swarm.

    import pandas as pd
    df = pd.read_parquet("p2p::s3://bucket/table.parquet", storage_options={"s3": {"endpoint_url": ...}})

    with fsspec.open("p2p::https://example.com/model.bin") as f:
        f.seek(1 << 30)
        header = f.read(64)          # fetches only the piece that holds these bytes

``P2PFileSystem`` is a chained filesystem (registered as ``p2p`` through the
``fsspec.specs`` entry point). Reads go to a damselfly daemon: the one named by the
``daemon=`` option (its socket), else the one the config names if its socket
exists, else an embedded daemon started in this process (no scheduler unless the
config names one, so it works with zero set-up). There is one embedded daemon per
process: ``embedded_dir`` places it when it starts, and later filesystems share it. What the daemon fetches it fetches
as whole pieces, from peers when the swarm has them and from the origin otherwise,
and keeps; a file opened here holds the last few pieces it read, so small reads
next to each other cost one daemon call.

What goes where:
- ``cat_file``/``open``/``cat_ranges`` read through the daemon (ranges fetch only
  the pieces that overlap them);
- ``info`` asks the daemon (the swarm knows a task's length once anyone fetched
  it, so a second reader sends nothing to the origin), then the target filesystem;
- ``ls``/``find``/``glob`` are the target filesystem's (listing is not cached);
- ``get_file`` has the daemon write the whole file (atomically).

The target's options (``s3={...}``) are what the daemon's source plugin gets too:
s3fs's ``key``/``secret``/``token``/``endpoint_url``/``client_kwargs`` become the
Download's ``object_storage``; ``token``/``revision`` of ``hf`` its
``hugging_face``; ``token`` of ``webhdfs`` its ``hdfs`` delegation token (each
source's options name their fsspec names: ``plugins/source/options.py``).
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fsspec.asyn import get_loop, sync
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.spec import AbstractBufferedFile

from damselfly.core.errors import DamselflyError, InvalidArgument, NotFound, PermissionDenied
from damselfly.plugins.source.options import from_fsspec
from damselfly.rpc import wire
from damselfly.sdk.client import Client

PROTOCOL = "p2p"


def _os_error(exc: DamselflyError, path: str) -> OSError:
    """A damselfly error as the OSError a data tool expects."""
    status = getattr(exc, "status_code", 0)
    if isinstance(exc, NotFound) or status == 404:
        return FileNotFoundError(errno.ENOENT, str(exc), path)
    if status in (401, 403) or isinstance(exc, PermissionDenied):  # the origin's refusal, or the daemon's policy
        return PermissionError(errno.EACCES, str(exc), path)
    if isinstance(exc, InvalidArgument):
        return ValueError(str(exc))  # type: ignore[return-value]
    return OSError(errno.EIO, str(exc), path)


# -- the embedded daemon ---------------------------------------------------------------------

_embedded_lock = threading.Lock()
_embedded: dict[str, Any] = {}


def embedded_socket(data_dir: str | None = None) -> Path:
    """The socket of this process's embedded daemon, started on first use (on fsspec's I/O loop)."""
    with _embedded_lock:
        if "daemon" in _embedded:
            return _embedded["daemon"].socket_path
        from damselfly.config import load_settings
        from damselfly.daemon.daemon import Daemon

        owned = data_dir is None
        root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="damselfly-embedded-"))
        settings = load_settings(daemon={"data_dir": str(root), "socket": str(root / "dfdaemon.sock")})
        daemon = Daemon(settings)
        sync(get_loop(), daemon.start)
        _embedded.update(daemon=daemon, root=root, owned=owned)

        def stop() -> None:
            try:
                sync(get_loop(), daemon.stop, timeout=10)
            except Exception:  # the interpreter is going away; the directory goes regardless
                pass
            if owned:
                shutil.rmtree(root, ignore_errors=True)

        atexit.register(stop)
        return daemon.socket_path


def _configured_socket() -> Path | None:
    from damselfly.config import load_settings

    try:
        path = load_settings().socket_path
    except DamselflyError:
        return None
    return path if path.exists() else None


# -- the filesystem --------------------------------------------------------------------------


class P2PFileSystem(ChainedFileSystem):
    protocol = PROTOCOL
    root_marker = ""

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: Any = None,
        daemon: str | None = None,
        embedded_dir: str | None = None,
        tag: str = "",
        application: str = "",
        piece_length: int = 0,
        filtered_query_params: list[str] | None = None,
        headers: dict[str, str] | None = None,
        source_options: dict[str, dict[str, Any]] | None = None,
        timeout: float | None = None,
        cached_pieces: int = 4,
        **kwargs: Any,
    ):
        kwargs.pop("fo", None)
        super().__init__(**kwargs)
        self.target_protocol = target_protocol or (fs.protocol if fs is not None else None)
        if isinstance(self.target_protocol, tuple | list):
            self.target_protocol = self.target_protocol[0]
        self.target_options = dict(target_options or {})
        self._target = fs
        self.daemon = daemon
        self.embedded_dir = embedded_dir
        self.request = {
            "tag": tag,
            "application": application,
            "piece_length": piece_length,
            "filtered_query_params": list(filtered_query_params or ()),
            "headers": dict(headers or {}),
            "timeout": timeout,
            "source_options": {
                **from_fsspec(self.target_protocol or "", self.target_options),
                **(source_options or {}),
            },
        }
        self.cached_pieces = cached_pieces
        self._socket: Path | None = None
        self._clients: dict[int, Client] = {}

    # -- plumbing ----------------------------------------------------------------------

    @property
    def target(self) -> Any:
        if self._target is None:
            if not self.target_protocol:
                raise ValueError("p2p needs a target: use a chained url such as p2p::s3://bucket/key")
            import fsspec

            self._target = fsspec.filesystem(self.target_protocol, **self.target_options)
        return self._target

    def socket(self) -> Path:
        if self._socket is None:
            if self.daemon:
                self._socket = Path(self.daemon)
            else:
                self._socket = _configured_socket() or embedded_socket(self.embedded_dir)
        return self._socket

    def _client(self) -> Client:
        client = self._clients.get(id(get_loop()))
        if client is None:
            client = self._clients[id(get_loop())] = Client(self.socket())
        return client

    def _run(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        client = self._client()
        try:
            return sync(get_loop(), getattr(client, method), *args, **kwargs)
        except DamselflyError as exc:
            raise _os_error(exc, path) from None

    def url(self, path: str) -> str:
        path = self._strip_protocol(path)
        if "://" in path:
            return path
        if not self.target_protocol:
            raise ValueError(f"p2p cannot tell the origin of {path!r}: use p2p::PROTOCOL://...")
        return f"{self.target_protocol}://{path.lstrip('/') if self.target_protocol != 'file' else path}"

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = str(path)
        if path.startswith(PROTOCOL + "::"):
            path = path[len(PROTOCOL) + 2 :]
        elif path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        return path

    def _read_kwargs(self) -> dict[str, Any]:
        r = self.request
        return {
            "headers": r["headers"],
            "tag": r["tag"],
            "application": r["application"],
            "filtered_query_params": r["filtered_query_params"],
            "piece_length": r["piece_length"],
            "timeout": r["timeout"],
            "source_options": r["source_options"],
        }

    # -- reading -------------------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        size = self._swarm_size(path)
        if size is not None:
            return {"name": self._strip_protocol(path), "size": size, "type": "file"}
        return dict(self.target.info(self._target_path(path), **kwargs))

    def _swarm_size(self, path: str) -> int | None:
        """The content length the daemon or its scheduler knows for this url's task, if any."""
        r = self.request
        try:
            task_id = wire.task_id_of(  # as the daemon computes it (the source's endpoint included)
                self.url(path),
                tag=r["tag"],
                application=r["application"],
                piece_length=r["piece_length"],
                filtered_query_params=r["filtered_query_params"],
                endpoint=wire.source_endpoint(r["source_options"] or {}),
            )
            task = sync(get_loop(), self._client().stat_task, task_id)
        except (DamselflyError, ValueError):
            return None
        return int(task.content_length) if task.content_length > 0 else None

    def _target_path(self, path: str) -> str:
        path = self._strip_protocol(path)
        return self.target._strip_protocol(path) if "://" in path else path

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.info(path)["size"]
            start = size + start if start is not None and start < 0 else start
            end = size + end if end is not None and end < 0 else end
        start = max(start or 0, 0)
        if end is not None and end <= start:
            return b""
        length = None if end is None else end - start
        try:
            return self._run("read", path, self.url(path), start, length, **self._read_kwargs())
        except ValueError as exc:  # a range past the end of the content
            if "outside the content" in str(exc):
                return b""
            raise

    def read_pieces(self, path: str, start: int, length: int) -> tuple[int, dict[int, bytes]]:
        return self._run("read_pieces", path, self.url(path), start, length, **self._read_kwargs())  # type: ignore[no-any-return]

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        self._run("download", rpath, self.url(rpath), os.path.abspath(lpath), **self._read_kwargs())

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> P2PFile:
        if mode != "rb":
            raise PermissionError(errno.EROFS, "p2p:// is read-only", path)
        size = self.info(path)["size"]
        return P2PFile(self, path, size, block_size=block_size, **kwargs)

    # -- listing: the target's -----------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        return self.target.ls(self._target_path(path), detail=detail, **kwargs)  # type: ignore[no-any-return]

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self.target.find(self._target_path(path), *args, **kwargs)

    def isdir(self, path: str) -> bool:
        if self._swarm_size(path) is not None:
            return False
        return bool(self.target.isdir(self._target_path(path)))

    def ukey(self, path: str) -> str:
        return self.url(path)

    # -- writing: never --------------------------------------------------------------------

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EROFS, "p2p:// is read-only")

    rm_file = rm = mkdir = makedirs = rmdir = put_file = pipe_file = cp_file = mv = touch = _refuse


class P2PFile(AbstractBufferedFile):
    """A read-only file whose reads fetch whole pieces through the daemon and keep the last few."""

    def __init__(self, fs: P2PFileSystem, path: str, size: int, block_size: int | None = None, **kwargs: Any):
        kwargs.pop("cache_type", None)
        block = block_size or "default"
        super().__init__(fs, path, mode="rb", block_size=block, cache_type="none", size=size, **kwargs)
        self.pieces: OrderedDict[int, bytes] = OrderedDict()

    def _piece_at(self, pos: int) -> tuple[int, bytes] | None:
        for offset, data in self.pieces.items():
            if offset <= pos < offset + len(data):
                self.pieces.move_to_end(offset)
                return offset, data
        return None

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        out = bytearray()
        pos = start
        while pos < end:
            hit = self._piece_at(pos)
            if hit is None:
                _, got = self.fs.read_pieces(self.path, pos, end - pos)
                for offset in sorted(got):
                    self.pieces[offset] = got[offset]
                while len(self.pieces) > max(self.fs.cached_pieces, len(got)):
                    self.pieces.popitem(last=False)
                hit = self._piece_at(pos)
                if hit is None:
                    raise OSError(errno.EIO, f"the daemon returned no piece holding byte {pos}", self.path)
            offset, data = hit
            take = data[pos - offset : min(end, offset + len(data)) - offset]
            out += take
            pos += len(take)
        return bytes(out)
