"""damselfly's own HTTP/2 framing against hyper-h2's, under the same gRPC server: decisions/s.

    pip install h2
    python benchmarks/rpc_framing.py [--runs 5] [--peers 10000] [--hosts 1000] [--tasks 100]
                                     [--concurrency 64] [--json]

The scheduler's gRPC server (``damselfly.rpc.server``) sits on ``damselfly.rpc.framing``, a
sans-IO HTTP/2 state machine of its own. This script carries the alternative that was
tried (issue 27): the same framing interface implemented on ``h2`` (hyper-h2, the sans-IO
HTTP/2 library of the family of the ``hpack`` package damselfly already uses), swapped in
under the unchanged server by :data:`damselfly.rpc.server.Server.connection_class`. It runs
``scheduler_load.py`` with ``--framing own`` and ``--framing h2`` alternately, ``--runs`` times
each with the same parameters, and prints a table and a JSON line with the medians.

The rule it was run for: h2 would replace the own framing if its median decisions/s were
within 15% of the own framing's. It was not: on 2026-12-08 03:10-03:15 UTC (the 2-core VM,
shared with other work at a load average of 4-9, so every figure is low), five alternating
runs each of ``scheduler_load.py``'s defaults gave the own framing 1,089 / 904 / 1,010 /
1,276 / 802 decisions/s (median 1,010) and h2 4.4.1 454 / 328 / 418 / 545 / 563 (median
454): 0.45 of the own. The scheduler's CPU for the same 10,000 peers, which contention
disturbs less, was 3.1 s against 7.0 s (medians); with h2's inbound header validation and
normalization off as well (two runs each, 03:17 UTC), 6.2-6.7 s against 2.6-3.1 s. So h2
stays here, out of the package, and this script rechecks the decision on another machine
or a later h2. ``python benchmarks/rpc_framing.py serve ARGS...`` runs ``damselfly ARGS...``
with the h2 framing installed; ``scheduler_load.py --framing h2`` starts its scheduler so.

Differences the h2 variant has and the product could not keep: a stream past
``max_streams`` ends the connection (h2 raises TooManyStreamsError) instead of being refused
with REFUSED_STREAM; h2 takes frames of up to 16 MiB until the client acknowledges our
settings (the own framing refuses one over 1 MiB at once); the server's GOAWAY on stopping
is written past h2's state machine (h2 sends nothing after its own GOAWAY, and running
calls must still end). The rest of tests/rpc/test_server.py passes on the h2 variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h2.config
import h2.connection
import hpack
from h2 import events as ev
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from loguru import logger

from damselfly.rpc.framing import (
    DEFAULT_WINDOW,
    MAX_FRAME,
    MAX_MESSAGE,
    MESSAGE_PREFIX,
    NO_ERROR,
    PROTOCOL_ERROR,
    WINDOW,
    Framing,
    Stream,
)
from damselfly.rpc.server import Server, ServerConnection

LOAD = Path(__file__).with_name("scheduler_load.py")
THRESHOLD = 0.15  # h2 is adopted if its median decisions/s is at most this much below the own framing's


class HyperFraming(Framing):
    """:class:`~damselfly.rpc.framing.Framing`'s interface on hyper-h2's ``H2Connection``.

    It comes first in a connection class's bases, so its methods replace the own framing's;
    the server's hooks (``_on_headers``, ``_message``, ...) are called as the own framing
    calls them. Flow control and settings are h2's; queued output (``Stream.pending``) and
    gRPC's message framing stay as the server expects them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = h2.config.H2Configuration(
            client_side=self.is_client,
            header_encoding=None,
            # the server's blocks are valid, and the own framing does not check them either
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self._block_decoder = hpack.Decoder()  # the server's blocks use no dynamic table
        self._blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def _pull(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._write(data)

    def initiate(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            }
        )
        self.h2.increment_flow_control_window(WINDOW - DEFAULT_WINDOW)
        self._pull()

    # -- input ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            logger.debug("HTTP/2 connection from {} failed: {}", self.peer_name, exc)
            data = self.h2.data_to_send()  # h2's GOAWAY; none for a bad preface
            if data:
                self._write(data)
            else:
                Framing._goaway(self, 0, PROTOCOL_ERROR, str(exc).encode()[:200])
            self._close()
            return
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                sid = event.stream_id
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
                st = self.streams.get(sid)
                if st is not None and not st.remote_closed:
                    self._grpc_data(st, event.data)
            elif kind is ev.RequestReceived or kind is ev.TrailersReceived or kind is ev.ResponseReceived:
                self._on_headers(event.stream_id, False, event.headers)  # the end comes as StreamEnded
            elif kind is ev.StreamEnded:
                st = self.streams.get(event.stream_id)
                if st is not None and not st.remote_closed:
                    st.remote_closed = True
                    self._on_remote_end(st)
            elif kind is ev.StreamReset:
                st = self.streams.get(event.stream_id)
                if st is not None:
                    self._on_reset(st, event.error_code)
            elif kind is ev.WindowUpdated or kind is ev.RemoteSettingsChanged:
                if self.blocked:
                    self._drain_blocked()
            elif kind is ev.ConnectionTerminated:
                self._on_goaway(event.last_stream_id or 0)
            if self.closed:
                return
        self._pull()

    def _grpc_data(self, st: Stream, data: bytes) -> None:
        """gRPC's length-prefixed messages out of a stream's DATA, as the own framing reads them."""
        rbuf = st.rbuf
        if not rbuf and len(data) >= 5:
            compressed, n = MESSAGE_PREFIX.unpack_from(data, 0)
            if len(data) == 5 + n:
                self._message(st, compressed, data[5:])
                return
        rbuf += data
        while len(rbuf) >= 5:
            compressed, n = MESSAGE_PREFIX.unpack_from(rbuf, 0)
            if n > MAX_MESSAGE:
                self._message_too_big(st, n)
                return
            if len(rbuf) < 5 + n:
                break
            msg = bytes(rbuf[5 : 5 + n])
            del rbuf[: 5 + n]
            self._message(st, compressed, msg)
            if st.sid not in self.streams:
                return

    # -- output -----------------------------------------------------------------------------

    def _send_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        headers = self._blocks.get(block)
        if headers is None:
            headers = self._block_decoder.decode(block, raw=True)
            if len(self._blocks) >= 64:
                self._blocks.clear()
            self._blocks[block] = headers
        try:
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except StreamClosedError:
            return
        self._pull()

    def _send_message(self, st: Stream, data: bytes, end_stream: bool = False) -> None:
        self._send_data(st, MESSAGE_PREFIX.pack(0, len(data)) + data, end_stream)

    def _send_data(self, st: Stream, payload: bytes, end_stream: bool = False) -> None:
        if st.pending or st.pending_end:
            st.pending += payload
            st.pending_end = st.pending_end or end_stream
            return
        try:
            n = max(0, min(len(payload), self.h2.local_flow_control_window(st.sid)))
        except StreamClosedError:
            return
        if n == len(payload):
            self._emit_data(st, payload, end_stream)
            return
        if n > 0:
            self._emit_data(st, payload[:n], False)
        st.pending += payload[n:]
        st.pending_end = end_stream
        self.blocked[st.sid] = st

    def _emit_data(self, st: Stream, payload: bytes, end_stream: bool) -> None:
        limit = self.h2.max_outbound_frame_size
        n = len(payload)
        if n <= limit:
            self.h2.send_data(st.sid, payload, end_stream=end_stream)
        else:
            for off in range(0, n, limit):
                self.h2.send_data(st.sid, payload[off : off + limit], end_stream=end_stream and off + limit >= n)
        self._pull()

    def _drain_blocked(self) -> None:
        for sid, st in list(self.blocked.items()):
            try:
                window = self.h2.local_flow_control_window(sid)
            except StreamClosedError:
                del self.blocked[sid]
                continue
            n = min(len(st.pending), window)
            if n <= 0 and st.pending:
                continue
            chunk = bytes(st.pending[:n])
            del st.pending[:n]
            done = not st.pending
            if chunk or (done and st.pending_end):
                self._emit_data(st, chunk, done and st.pending_end)
            if done:
                del self.blocked[sid]
                st.pending_end = False
                if st.trailers is not None:
                    block, st.trailers = st.trailers, None
                    self._send_headers(sid, block, True)
                    self._local_done(st)
                if st.drained is not None and not st.drained.done():
                    st.drained.set_result(None)
            if self.h2.outbound_flow_control_window <= 0:
                break

    def _reset(self, sid: int, code: int) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except StreamClosedError:
            pass
        self.streams.pop(sid, None)
        self.blocked.pop(sid, None)
        self._pull()

    def _goaway(self, last_sid: int, code: int = NO_ERROR, message: bytes = b"") -> None:
        self._pull()  # what h2 queued goes first
        super()._goaway(last_sid, code, message)


class HyperServerConnection(HyperFraming, ServerConnection):
    """The server's connection, on hyper-h2."""


def install() -> None:
    """Serve every connection of every :class:`Server` in this process on hyper-h2."""
    Server.connection_class = HyperServerConnection


def serve(args: list[str]) -> None:
    """``damselfly ARGS...`` (the scheduler, for scheduler_load.py) with the h2 framing installed."""
    install()
    from damselfly.cli import main as damselfly_main

    sys.argv = ["damselfly", *args]
    damselfly_main()


def run_load(framing: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(LOAD),
        "--json",
        "--framing",
        framing,
        *("--peers", str(args.peers), "--hosts", str(args.hosts), "--tasks", str(args.tasks)),
        *("--concurrency", str(args.concurrency)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each framing, alternating")
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=1_000)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {"own": [], "h2": []}
    for i in range(args.runs):
        for framing in ("own", "h2") if i % 2 == 0 else ("h2", "own"):
            r = run_load(framing, args)
            runs[framing].append(r)
            print(
                f"run {i + 1} {framing:>3}: {r['decisions_per_second']:>8} decisions/s, "
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, scheduler CPU {r['scheduler_cpu_seconds']} s, "
                f"errors {r['errors']}",
                file=sys.stderr,
            )

    def median(framing: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[framing]), 2)

    own, h2 = median("own", "decisions_per_second"), median("h2", "decisions_per_second")
    ratio = round(h2 / own, 3)
    result = {
        "peers": args.peers,
        "hosts": args.hosts,
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "runs": args.runs,
        "own_decisions_per_second": [r["decisions_per_second"] for r in runs["own"]],
        "h2_decisions_per_second": [r["decisions_per_second"] for r in runs["h2"]],
        "own_median": own,
        "h2_median": h2,
        "h2_over_own": ratio,
        "own_p50_ms": median("own", "p50_ms"),
        "h2_p50_ms": median("h2", "p50_ms"),
        "own_p99_ms": median("own", "p99_ms"),
        "h2_p99_ms": median("h2", "p99_ms"),
        "own_scheduler_cpu_seconds": median("own", "scheduler_cpu_seconds"),
        "h2_scheduler_cpu_seconds": median("h2", "scheduler_cpu_seconds"),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
        "h2_within_threshold": ratio >= 1 - THRESHOLD,
        "h2_version": _h2_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print(f"{'framing':>8} {'decisions/s (median)':>21} {'p50 ms':>7} {'p99 ms':>7} {'sched CPU s':>11}")
    for name in ("own", "h2"):
        print(
            f"{name:>8} {result[f'{name}_median']:>21} {result[f'{name}_p50_ms']:>7} "
            f"{result[f'{name}_p99_ms']:>7} {result[f'{name}_scheduler_cpu_seconds']:>11}"
        )
    verdict = "adopt h2" if result["h2_within_threshold"] else "keep the own framing"
    print(f"h2 / own: {ratio} (h2 is adopted at >= {1 - THRESHOLD}): {verdict}")
    if args.json:
        print(json.dumps(result))


def _h2_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("h2")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
