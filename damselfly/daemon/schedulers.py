"""The schedulers a daemon reports to: each task goes to one, chosen by rendezvous hashing of its id.

A scheduler that does not answer is skipped for a while and its tasks go to the next one
in their order; host announcements go to all of them. A scheduler is *new* to this daemon
when it takes an AnnounceHost for the first time, after a call to it failed, or with a boot
id (the ``damselfly-scheduler-boot`` trailer) other than last time: it has lost, or never
had, what this daemon holds, and is told again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from loguru import logger

from damselfly.config import TlsConfig
from damselfly.daemon.context import GRPC_OPTIONS
from damselfly.rpc.wire import BOOT_METADATA, duration
from damselfly.security import tls

# a scheduler that went away is tried again within seconds (gRPC's own backoff grows to two minutes)
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 3000)]


def scheduler_order(addresses: list[str], task_id: str) -> list[str]:
    """Schedulers in the order a task tries them: rendezvous hashing of the task id's prefix."""
    return sorted(addresses, key=lambda a: hashlib.sha256(f"{a}/{task_id[:5]}".encode()).digest(), reverse=True)


class SchedulerPool:
    """The configured schedulers; a task goes to one chosen by rendezvous hashing of its id.

    A scheduler that does not answer is marked down for ``DOWN_FOR`` seconds: its
    tasks go to the next one in their order meanwhile, without waiting on it again.
    """

    DOWN_FOR = 30.0

    def __init__(self, addresses: list[str], connect_timeout: float, tls_config: TlsConfig | None = None):
        self.addresses = list(addresses)
        self.connect_timeout = connect_timeout
        self.tls = tls_config  # mutual TLS to the schedulers when enabled
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._down: dict[str, float] = {}  # address -> monotonic time until which it is skipped
        self._boots: dict[str, str] = {}  # address -> the boot id it gave when it last took AnnounceHost
        self._new: set[str] = set()  # took an AnnounceHost while new to this daemon: to be told what it holds

    def is_down(self, address: str) -> bool:
        return self._down.get(address, 0.0) > time.monotonic()

    def mark_down(self, address: str) -> bool:
        """Skip ``address`` for a while (it is new again once it answers); True when it was up until now."""
        self._boots.pop(address, None)
        was_up = not self.is_down(address)
        self._down[address] = time.monotonic() + self.DOWN_FOR
        return was_up

    def preference(self, task_id: str) -> list[str]:
        """The task's schedulers in the order to try them now: those marked down last."""
        order = self.order(task_id)
        return [a for a in order if not self.is_down(a)] + [a for a in order if self.is_down(a)]

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = tls.grpc_channel(address, self.tls, [*GRPC_OPTIONS, *RECONNECT_OPTIONS])
        return ch

    def order(self, key: str) -> list[str]:
        return scheduler_order(self.addresses, key)

    async def _ready(self, address: str) -> grpc.aio.Channel | None:
        ch = self._channel(address)
        try:
            await asyncio.wait_for(ch.channel_ready(), self.connect_timeout)
            return ch
        except (TimeoutError, grpc.aio.AioRpcError):
            return None

    async def stub_for(self, task_id: str) -> scheduler_pb2_grpc.SchedulerStub | None:
        picked = await self.pick(task_id)
        return picked[1] if picked is not None else None

    async def pick(self, task_id: str) -> tuple[str, scheduler_pb2_grpc.SchedulerStub] | None:
        """The task's scheduler and a stub for it: the first in its order that answers."""
        for address in self.preference(task_id):
            ch = await self._ready(address)
            if ch is not None:
                self._down.pop(address, None)
                return address, scheduler_pb2_grpc.SchedulerStub(ch)
            logger.warning("scheduler {} does not answer; trying the next", address)
            self.mark_down(address)
        return None

    async def announce_host(
        self, host: common_pb2.Host, interval: float, addresses: list[str] | None = None
    ) -> tuple[list[str], list[str]]:
        """AnnounceHost to every scheduler (or to ``addresses``): those that took it, and those
        that did not. Those of them new to this daemon are kept for :meth:`take_new`."""
        took, failed = [], []
        for address in self.addresses if addresses is None else addresses:
            stub = scheduler_pb2_grpc.SchedulerStub(self._channel(address))
            try:
                call = stub.AnnounceHost(
                    scheduler_pb2.AnnounceHostRequest(host=host, interval=duration(interval)),
                    timeout=self.connect_timeout,
                    wait_for_ready=True,  # a scheduler coming back is waited for, not failed at once
                )
                await call
                boot = _text((await call.trailing_metadata() or {}).get(BOOT_METADATA, ""))
            except grpc.aio.AioRpcError as exc:
                logger.debug("AnnounceHost to {} failed: {}", address, exc.code().name)
                self._boots.pop(address, None)
                failed.append(address)
                continue
            took.append(address)
            self._down.pop(address, None)
            if self._boots.get(address) != boot:
                self._new.add(address)
            self._boots[address] = boot
        return took, failed

    def take_new(self) -> list[str]:
        """The schedulers that took an AnnounceHost while new to this daemon (each handed out once)."""
        new, self._new = sorted(self._new), set()
        return new

    async def connection_lost(self, address: str) -> None:
        """Return when the connection to ``address`` drops (after it was up): the scheduler may have
        restarted, and an AnnounceHost finds out at once."""
        ch = self._channel(address)
        ready = grpc.ChannelConnectivity.READY
        state = ch.get_state()
        while state is not ready:
            await ch.wait_for_state_change(state)
            state = ch.get_state()
        while state is ready:
            await ch.wait_for_state_change(state)
            state = ch.get_state()

    async def delete_host(self, host_id: str) -> None:
        for address in self.addresses:
            stub = scheduler_pb2_grpc.SchedulerStub(self._channel(address))
            try:
                await stub.DeleteHost(scheduler_pb2.DeleteHostRequest(host_id=host_id), timeout=1.0)
            except grpc.aio.AioRpcError:
                pass

    async def stat_task(self, host_id: str, task_id: str) -> common_pb2.Task | None:
        stub = await self.stub_for(task_id)
        if stub is None:
            return None
        try:
            return await stub.StatTask(scheduler_pb2.StatTaskRequest(host_id=host_id, task_id=task_id), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    async def delete_task(self, host_id: str, task_id: str) -> None:
        stub = await self.stub_for(task_id)
        if stub is not None:
            try:
                await stub.DeleteTask(scheduler_pb2.DeleteTaskRequest(host_id=host_id, task_id=task_id), timeout=5)
            except grpc.aio.AioRpcError:
                pass

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
