"""This download's side of the scheduler: its AnnouncePeer stream, and the source digests of pieces it learns.

``SchedulerLink`` writes the stream's messages through one queue so they never interleave;
``PieceAuthority`` keeps the source reader's digest of each piece, from the scheduler's
answers or asked with ``StatTask``, which every piece from a parent is checked against.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from dragonfly_api import common_pb2, scheduler_pb2

# a piece whose source digest the scheduler's answer did not carry: StatTask is asked at most
# this often (one call answers every fetch waiting), and a fetch waits this long for it
STAT_INTERVAL = 0.2
AUTHORITY_WAIT = 3.0


class SchedulerLink:
    """One AnnouncePeer stream; writes go through one queue so they never interleave."""

    def __init__(self, call: grpc.aio.StreamStreamCall, host_id: str, task_id: str, peer_id: str):
        self.call = call
        self.host_id, self.task_id, self.peer_id = host_id, task_id, peer_id
        self._queue: asyncio.Queue[scheduler_pb2.AnnouncePeerRequest | None] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while (req := await self._queue.get()) is not None:
                await self.call.write(req)
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream is gone; the reader side sees why and decides what to do

    def send(self, **kwargs: object) -> None:
        self._queue.put_nowait(
            scheduler_pb2.AnnouncePeerRequest(
                host_id=self.host_id, task_id=self.task_id, peer_id=self.peer_id, **kwargs
            )
        )

    async def read(self) -> scheduler_pb2.AnnouncePeerResponse | None:
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            return None
        return resp  # type: ignore[return-value]

    async def close(self) -> None:
        """Flush what is queued, half-close, and let the scheduler end the stream.

        Cancelling instead could drop the last messages (the scheduler would then
        never hear that this peer finished), so cancel only if it does not end.
        """
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), 5)
            await asyncio.wait_for(self.call.code(), 5)
        except TimeoutError:
            pass
        finally:
            self.call.cancel()


class PieceAuthority:
    """The source reader's digest of each piece, as the scheduler has it: from its answer,
    else asked with ``StatTask``. One call at a time, at most every ``interval`` seconds,
    answers every fetch waiting on a digest; a fetch waits ``wait`` seconds at most, then
    gets None (the piece is not stored: it is fetched again later). ``stat`` returns None
    when no scheduler that knows the task answers (``reachable`` is then False): the fetch
    gets None at once. A scheduler that has answered with no digest at all for ``wait``
    seconds learnt of the task from announcements only (``bare``): no fetch waits on it
    any more, until it has a digest."""

    def __init__(
        self,
        stat: Callable[[], Awaitable[common_pb2.Task | None]],
        interval: float = STAT_INTERVAL,
        wait: float = AUTHORITY_WAIT,
    ):
        self.known: dict[int, str] = {}
        self._stat = stat
        self.interval = interval
        self.wait = wait
        self.calls = 0
        self.reachable = True
        self._bare_since: float | None = None  # since when the scheduler's answers carry no digest
        self._call: asyncio.Task[None] | None = None
        self._last = -math.inf

    def learn(self, pieces: Iterable[common_pb2.Piece]) -> None:
        for pb in pieces:
            if pb.digest:
                self.known[pb.number] = pb.digest

    async def _ask(self) -> None:
        delay = self._last + self.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last = time.monotonic()
        self.calls += 1
        task = await self._stat()
        self.reachable = task is not None
        if task is not None and not any(pb.digest for pb in task.pieces):
            self._bare_since = self._bare_since if self._bare_since is not None else self._last
        else:
            self._bare_since = None
        if task is not None:
            self.learn(task.pieces)

    @property
    def bare(self) -> bool:
        return self._bare_since is not None and time.monotonic() - self._bare_since >= self.wait

    async def digest(self, number: int) -> str | None:
        """Piece ``number``'s source digest; asks the scheduler when it is not known yet."""
        asked = time.monotonic()
        while number not in self.known:
            if time.monotonic() - asked > self.wait or self.bare:
                return None
            call = self._call
            if call is None or call.done():
                self._call = call = asyncio.get_running_loop().create_task(self._ask())
            # a call that asked before the piece was reported does not know it: the loop asks again
            await asyncio.shield(call)
            if not self.reachable:
                return self.known.get(number)
        return self.known[number]

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            await asyncio.gather(self._call, return_exceptions=True)
