"""Piece connections to parents, pooled across pieces and tasks, over the transports both sides serve.

The pool is bounded (``security.limits``): a transport says how many connections to one
parent are worth having, the whole pool holds at most ``piece_connections``, and a
connection idle for ``piece_idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loguru import logger

from damselfly.config import LimitsConfig
from damselfly.contracts import PieceConnection, Transport
from damselfly.core.errors import DamselflyError, PeerError


@dataclass
class _Opening:
    """Connections being made to one parent over one transport, and a wake-up for when one is."""

    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ConnectionPool:
    """Piece connections to parents, shared across pieces and tasks, over negotiated transports.

    A parent announces the transports it serves with their addresses; the child tries
    its own transports in its configured order among those, and falls back to the
    next one, per parent, when a connection cannot be made, logging why. A transport
    that failed to a parent is not tried there again for ``retry_after`` seconds.

    Each transport says how many connections to one parent are worth having
    (``connections_per_parent``): many for TCP, where a request holds its connection,
    one for QUIC, whose streams multiplex. Beyond that, fetches share the least busy.

    Bounded (``security.limits``): at most ``max_connections`` pooled connections in all
    (past it the longest idle one is closed to make room, else fetches share or wait),
    and a connection idle for ``idle_timeout`` seconds is closed.
    """

    def __init__(
        self,
        transports: list[Transport],
        connect_timeout: float,
        retry_after: float = 60,
        *,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
    ):
        self.transports = transports
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        limits = next((t.security.limits for t in transports if t.security is not None), None) or LimitsConfig()
        self.max_connections = max_connections or limits.piece_connections
        self.idle_timeout = idle_timeout or limits.piece_idle_timeout
        self._conns: dict[str, list[PieceConnection]] = {}
        self._load: dict[PieceConnection, int] = {}  # fetches using each connection
        self._key: dict[PieceConnection, str] = {}
        self._idle: dict[PieceConnection, float] = {}  # idle since (monotonic), the longest idle first
        self._opening: dict[str, _Opening] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._room = asyncio.Event()  # set (and replaced) when a connection closes or goes idle
        self._reaper: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """Connections pooled or being made."""
        return len(self._load) + sum(o.count for o in self._opening.values())

    async def acquire(self, addresses: dict[str, str]) -> tuple[str, PieceConnection]:
        """A connection to the parent serving ``addresses`` (transport name -> address) and its pool key."""
        reasons: list[str] = []
        for t in self.transports:
            address = addresses.get(t.name)
            if address is None:
                continue
            key = f"{t.name}|{address}"
            try:
                return key, await self._acquire(t, key, address)
            except DamselflyError as exc:
                reasons.append(f"{t.name}: {exc}")
        if not reasons:
            mine = ", ".join(t.name for t in self.transports)
            theirs = ", ".join(sorted(addresses)) or "none"
            raise PeerError(f"no common transport with the parent (mine: {mine}; theirs: {theirs})")
        raise PeerError("no transport reached the parent: " + "; ".join(reasons))

    def _take(self, conn: PieceConnection) -> PieceConnection:
        self._load[conn] += 1
        self._idle.pop(conn, None)
        return conn

    async def _acquire(self, t: Transport, key: str, address: str) -> PieceConnection:
        while True:
            conns = self._conns.setdefault(key, [])  # anew each time: ``drop`` may have replaced it
            for dead in [c for c in conns if c.broken and not self._load[c]]:  # broke while idle
                await self._remove(dead)
            live = [c for c in conns if not c.broken]
            opening = self._opening.get(key)
            at_cap = len(live) + (opening.count if opening else 0) >= t.connections_per_parent
            if live and (min(self._load[c] for c in live) == 0 or at_cap):
                return self._take(min(live, key=self._load.__getitem__))  # an idle one, else the least busy
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < self.retry_after:
                raise PeerError(failed[1])
            if at_cap:
                assert opening is not None
                await opening.done.wait()  # the connections being made are all we may have: wait for one
                continue
            if self.size < self.max_connections:
                break
            if self._idle:  # the pool is full: the longest idle connection makes room
                await self._remove(next(iter(self._idle)))
                continue
            if live:
                return self._take(min(live, key=self._load.__getitem__))
            room = self._room
            await room.wait()  # every pooled connection is busy: wait for one to close or go idle
        opening = self._opening.setdefault(key, _Opening())
        opening.count += 1
        try:
            conn = await t.connect(address, self.connect_timeout)
        except DamselflyError as exc:
            self._failed[key] = (time.monotonic(), str(exc))
            logger.warning("transport {} to {} failed, trying the next one: {}", t.name, address, exc)
            raise
        finally:
            opening.count -= 1
            opening.done.set()
            opening.done = asyncio.Event()
            self._make_room()
        self._conns.setdefault(key, []).append(conn)
        self._load[conn] = 1
        self._key[conn] = key
        return conn

    def _make_room(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    async def _remove(self, conn: PieceConnection) -> None:
        key = self._key.pop(conn, None)
        if key is None:
            return
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        self._load.pop(conn, None)
        self._idle.pop(conn, None)
        self._make_room()
        await conn.close()

    async def release(self, key: str, conn: PieceConnection) -> None:
        if conn not in self._load:
            return  # dropped while this fetch ran
        self._load[conn] -= 1
        if self._load[conn]:
            return
        if conn.broken:
            await self._remove(conn)
            return
        self._idle[conn] = time.monotonic()
        self._make_room()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections idle for ``idle_timeout``; ends when none is idle."""
        while self._idle:
            conn, since = next(iter(self._idle.items()))
            wait = since + self.idle_timeout - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            logger.debug("closing a piece connection idle for {:.0f}s", self.idle_timeout)
            await self._remove(conn)

    async def drop(self, key: str) -> None:
        for conn in self._conns.pop(key, []):
            await self._remove(conn)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        for key in list(self._conns):
            await self.drop(key)
