"""An in-process fabric with reliable-connected queue-pair semantics, for testing the rdma transport.

This machine (and CI's) has no RDMA device and no RDMA in its kernel, so the rdma
plugin's ``VerbsQueuePair`` cannot run here. ``LoopbackQueuePair`` stands in for
it, with the behaviour the plugin relies on:

- messages arrive in order, each into the oldest receive buffer posted;
- a SEND that finds no receive posted waits (hardware retries on RNR for ever with
  ``rnr_retry`` 7), so a receiver that holds its buffers holds back the sender;
- a SEND completes once the other side has received it;
- a SEND to a queue pair that is gone fails (transport retries exceeded) and takes
  the sender's queue pair to the error state, flushing its posted receives;
- a queue pair that is gone tells its peer nothing: its peer's receives just wait.

``LoopbackRdmaTransport`` is the rdma plugin over this fabric; the conformance kit
runs against it. Parent and child must be in one process (one event loop).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from damselfly.plugins.transport.rdma import Completion, Endpoint, RdmaTransport

GID = bytes.fromhex("fe800000000000000000000000000001")


class LoopbackQueuePair:
    _numbers = itertools.count(1)
    fabric: ClassVar[dict[int, LoopbackQueuePair]] = {}

    def __init__(self, message_size: int, send_depth: int, recv_depth: int):
        self.message_size, self.send_depth, self.recv_depth = message_size, send_depth, recv_depth
        self.num = next(self._numbers)
        self.remote: int | None = None
        self.recv_posted: deque[int] = deque()
        self.recv_data: dict[int, bytes] = {}
        self.outbox: deque[tuple[int, bytes, int | None]] = deque()
        self.done: list[Completion] = []
        self.wake: Callable[[], None] | None = None
        self.scheduled = False
        self.error = False
        self.fabric[self.num] = self

    def endpoint(self) -> Any:
        return Endpoint(num=self.num, lid=1, gid=GID)

    def connect(self, remote: Any) -> None:
        if remote.gid != GID:
            raise ValueError("no route to that GID on the loopback fabric")
        self.remote = remote.num

    def post_recv(self, slot: int) -> None:
        if not 0 <= slot < self.recv_depth or slot in self.recv_posted:
            raise ValueError(f"receive slot {slot} is out of range or posted twice")
        if self.error:
            self._complete(Completion(True, slot, error="WR flushed"))
            return
        self.recv_posted.append(slot)
        peer = self.fabric.get(self.remote or -1)
        if peer is not None and peer.remote == self.num:
            peer._pump()

    def post_send(self, slot: int, data: bytes | memoryview, imm: int | None = None) -> None:
        if len(data) > self.message_size:
            raise ValueError(f"{len(data)} bytes do not fit a {self.message_size}-byte slot")
        if len(self.outbox) >= self.send_depth:
            raise ValueError("more sends posted than the send queue holds")
        self.outbox.append((slot, bytes(data), imm))
        self._pump()

    def _pump(self) -> None:
        peer = self.fabric.get(self.remote or -1)
        if peer is None or peer.error:
            self._fail()
            return
        while self.outbox and peer.recv_posted:
            slot, data, imm = self.outbox.popleft()
            rslot = peer.recv_posted.popleft()
            peer.recv_data[rslot] = data
            peer._complete(Completion(True, rslot, len(data), imm))
            self._complete(Completion(False, slot, len(data)))

    def _fail(self) -> None:
        if not self.outbox:
            return
        self.error = True
        while self.outbox:
            slot, _, _ = self.outbox.popleft()
            self._complete(Completion(False, slot, error="transport retry counter exceeded"))
        while self.recv_posted:
            self._complete(Completion(True, self.recv_posted.popleft(), error="WR flushed"))

    def _complete(self, c: Completion) -> None:
        self.done.append(c)
        self._schedule()

    def _schedule(self) -> None:
        if self.wake is not None and self.done and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._run_wake)

    def _run_wake(self) -> None:
        self.scheduled = False
        if self.wake is not None:
            self.wake()

    def read(self, slot: int, length: int) -> bytes:
        return self.recv_data.pop(slot)[:length]

    def poll(self) -> list[Completion]:
        done, self.done = self.done, []
        return done

    def watch(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self._schedule()  # for what completed before

    def close(self) -> None:
        if self.fabric.pop(self.num, None) is None:
            return
        self.wake = None
        peer = self.fabric.get(self.remote or -1)
        if peer is not None:
            peer._pump()  # its waiting sends now fail


class LoopbackRdmaTransport(RdmaTransport):
    """The rdma plugin with its queue pairs on the loopback fabric."""

    @classmethod
    def available(cls) -> str | None:
        return None

    def open_queue_pair(self) -> LoopbackQueuePair:
        o = self.options
        return LoopbackQueuePair(o.message_size, o.send_depth, o.recv_depth)
