"""The fault harness: each fault of the TCP proxy, the process faults and the disk fault."""

import asyncio
import subprocess
import sys

import pytest

from damselfly.testing import faults
from damselfly.testing.faults import FaultProxy, apply_flips
from tests.helpers.waiting import wait_for, wait_until

pytestmark = pytest.mark.timeout(30)

DATA = bytes(range(256)) * 1024  # 256 KiB: several chunks


class Target:
    """A TCP server that sends ``DATA`` to each client, and keeps what each client sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.got = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(DATA)
        await writer.drain()
        writer.write_eof()
        self.received.append(await reader.read())
        self.got.set()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc):
        self.server.close()


async def exchange(port: int, payload: bytes = b"") -> bytes:
    """Send ``payload`` (then EOF) through the proxy on ``port``; all the bytes that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await reader.read()
    finally:
        writer.close()


def test_flips_invert_exactly_the_bytes_at_the_offsets_within_a_chunk():
    assert apply_flips(b"\x00\x01\x02", 10, {11, 13, 9}) == b"\x00\xfe\x02"
    assert apply_flips(b"abc", 0, set()) == b"abc"


async def test_the_proxy_passes_bytes_both_ways_unchanged_and_counts_them():
    target = Target()
    async with target as port, FaultProxy("127.0.0.1", port) as proxy:
        assert await exchange(proxy.port, b"hello" * 1000) == DATA
        await target.got.wait()
        assert target.received == [b"hello" * 1000]
        assert (proxy.counters.connections, proxy.counters.down_bytes) == (1, len(DATA))
        assert proxy.counters.up_bytes == 5000


async def test_flipped_offsets_arrive_inverted_and_every_other_byte_intact():
    target = Target()
    async with target as port, FaultProxy("127.0.0.1", port) as proxy:
        proxy.down.flips.update({0, 70_000, len(DATA) - 1})
        got = await exchange(proxy.port)
    assert len(got) == len(DATA)
    assert [i for i in range(len(DATA)) if got[i] != DATA[i]] == [0, 70_000, len(DATA) - 1]
    assert got[70_000] == DATA[70_000] ^ 0xFF


async def test_a_cut_closes_the_connection_after_exactly_n_bytes():
    target = Target()
    async with target as port, FaultProxy("127.0.0.1", port) as proxy:
        proxy.down.cut_after = 100_000
        got = await exchange(proxy.port)
        assert got == DATA[:100_000]
        assert proxy.counters.cuts == 1
        proxy.down.clear()  # switched off at run time: the next connection is whole
        assert await exchange(proxy.port) == DATA
        proxy.down.cut_after, proxy.down.cut_once = 5000, True
        assert await exchange(proxy.port) == DATA[:5000]
        assert await exchange(proxy.port) == DATA  # one cut only
        assert proxy.counters.cuts == 2


async def test_a_stall_holds_the_bytes_until_released_and_loses_none():
    target = Target()
    async with target as port, FaultProxy("127.0.0.1", port) as proxy:
        proxy.down.stall()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await wait_for(lambda: proxy.counters.connections, 10, what="the proxy to accept")
        # nothing passes while stalled (this is the one wait that can only be a timeout)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        assert proxy.down.stalled and proxy.counters.down_bytes == 0
        proxy.down.release()
        writer.write_eof()
        assert await reader.read() == DATA
        writer.close()


async def test_throttle_and_delay_wait_in_proportion_to_the_bytes_and_send_small_parts():
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    target = Target()
    async with target as port, FaultProxy("127.0.0.1", port, sleep=record) as proxy:
        proxy.down.rate = 100_000  # bytes per second: parts of 10,000 bytes
        assert await exchange(proxy.port) == DATA
        assert sum(waits) == pytest.approx(len(DATA) / 100_000)
        assert max(waits) <= 0.1 + 1e-9 and len(waits) >= len(DATA) // 10_000
        waits.clear()
        proxy.down.rate, proxy.down.delay = None, 0.25
        assert await exchange(proxy.port) == DATA
        assert waits and set(waits) == {0.25}  # once per chunk read


async def test_an_unreachable_target_closes_the_client_connection():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        try:
            got = await exchange(proxy.port)
        except ConnectionError:
            got = b""
        assert got == b"" and proxy.counters.connections == 1


def test_a_stopped_process_is_frozen_until_continued_and_a_killed_one_dies_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with faults.stopped(proc.pid):
            _wait_state(proc.pid, "T")
        _wait_state(proc.pid, "S", "R")
        faults.kill(proc.pid)
        assert proc.wait(10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_state(pid: int, *states: str) -> None:
    wait_until(lambda: faults.process_state(pid) in states, 10, what=f"process {pid} to reach {states}")


@pytest.mark.skipif(faults.disk_faults_unavailable() is not None, reason=str(faults.disk_faults_unavailable()))
def test_a_small_disk_fills_up_and_then_refuses_writes(tmp_path):
    with faults.small_disk(tmp_path / "data", 4 << 20) as disk:
        written = faults.fill(disk)
        assert 3 << 20 <= written <= 4 << 20
        with pytest.raises(OSError, match="No space left"):
            (disk / "more").write_bytes(b"x" * (1 << 20))
    assert not (tmp_path / "data" / ".filler").exists()  # unmounted: the filler went with it
