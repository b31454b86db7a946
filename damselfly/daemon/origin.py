"""Protecting the origin from this daemon: retries that back off, and a cap on reads per origin host.

An origin that answers 429 or 503 (or 500, 502, 504: transient) is asked again after a
delay: the one its ``Retry-After`` names (seconds or an HTTP date), else an exponential
backoff with jitter (``source_retry_backoff`` doubling per attempt, each delay between
half and all of it), at most ``source_retries`` times and ``source_retry_budget`` seconds
of waiting in all. Any other failure, and a ``Retry-After`` beyond what is left of the
budget, ends the read at once. The policy (``RetryPolicy.delay``) is pure: time and
randomness are handed in. Every source's reads go through it, since its errors
(``BackendError``) carry the origin's status and headers.

``OriginGate`` holds one semaphore per origin (``scheme://host:port``): at most
``source_host_reads`` reads of one origin at once from this daemon, across its downloads.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from damselfly.core.errors import BackendError
from damselfly.rpc.wire import redact_url

if TYPE_CHECKING:
    from loguru import Logger

    from damselfly.config import DaemonConfig
    from damselfly.telemetry.metrics import DaemonMetrics

T = TypeVar("T")

TRANSIENT = frozenset({429, 500, 502, 503, 504})  # the origin's statuses worth asking again
_DEFAULT_PORTS = {"http": 80, "https": 443}


def retry_after(headers: dict[str, str], now: float) -> float | None:
    """Seconds the origin's ``Retry-After`` asks for (delta-seconds or an HTTP date, against the
    wall clock ``now``); None when absent or unreadable."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    """When to ask the origin again after a failure, and after how long."""

    retries: int  # attempts after the first
    backoff: float  # the first delay without Retry-After; doubles per attempt
    budget: float  # seconds of waiting in all, across the attempts

    @classmethod
    def of(cls, cfg: DaemonConfig) -> RetryPolicy:
        return cls(cfg.source_retries, cfg.source_retry_backoff, cfg.source_retry_budget)

    def delay(self, exc: BaseException, attempt: int, waited: float, now: float, rand: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` failed with ``exc``, counted
        from 0; ``waited`` seconds spent waiting so far; ``rand`` in [0, 1)), or None: give up."""
        if not isinstance(exc, BackendError) or exc.status_code not in TRANSIENT or attempt >= self.retries:
            return None
        asked = retry_after(exc.headers, now)
        if asked is None:
            full = self.backoff * 2**attempt
            asked = full / 2 + rand * full / 2
        if waited + asked > self.budget:
            return None
        return asked


async def with_retries(
    policy: RetryPolicy,
    what: str,
    log: Logger,
    attempt_once: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[int], None] | None = None,
) -> T:
    """``attempt_once()``, again after each transient failure as ``policy`` allows; each retry
    is logged with its reason. ``on_retry`` hears the status of each one."""
    waited = 0.0
    attempt = 0
    while True:
        try:
            return await attempt_once()
        except BackendError as exc:
            pause = policy.delay(exc, attempt, waited, time.time(), random.random())
            if pause is None:
                raise
            log.warning(
                "origin answered {} for {} (attempt {} of {}): again in {:.2f}s",
                exc.status_code,
                what,
                attempt + 1,
                policy.retries + 1,
                pause,
            )
            if on_retry is not None:
                on_retry(exc.status_code)
            await asyncio.sleep(pause)
            waited += pause
            attempt += 1


def origin_of(url: str) -> str:
    """The origin a URL is read from, ``scheme://host:port``, the key of its cap."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or _DEFAULT_PORTS.get(parts.scheme)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{port}" if port else f"{parts.scheme}://{host}"


@dataclass
class OriginGate:
    """At most ``per_origin`` reads of one origin at once, across this daemon's downloads."""

    per_origin: int
    _held: dict[str, asyncio.Semaphore] = field(default_factory=dict)

    def limit(self, url: str) -> asyncio.Semaphore:
        key = origin_of(url)
        sem = self._held.get(key)
        if sem is None:
            sem = self._held[key] = asyncio.Semaphore(self.per_origin)
        return sem


# One gate per daemon: its metrics object is the one thing a download's context shares
# with no other daemon in the process (tests run several daemons in one loop).
_GATES: WeakKeyDictionary[object, OriginGate] = WeakKeyDictionary()


def gate_of(owner: object, per_origin: int) -> OriginGate:
    """The origin gate of the daemon that ``owner`` (its metrics) belongs to."""
    gate = _GATES.get(owner)
    if gate is None:
        gate = _GATES[owner] = OriginGate(per_origin)
    return gate


class OriginCalls:
    """How one download calls its origin: within its daemon's cap (``OriginGate``), retried as
    ``RetryPolicy`` says, each retry logged and counted by status."""

    def __init__(self, metrics: DaemonMetrics, cfg: DaemonConfig, url: str, log: Logger):
        self._slot = gate_of(metrics, cfg.source_host_reads).limit(url)
        self._policy = RetryPolicy.of(cfg)
        self._retries = metrics.source_retries
        self._what = redact_url(url)
        self._log = log

    def slot(self) -> asyncio.Semaphore:
        """Held for one request to the origin."""
        return self._slot

    async def retrying(self, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """``attempt_once()`` (one request to the origin), again after each transient failure."""
        retries = self._retries
        return await with_retries(
            self._policy, self._what, self._log, attempt_once, on_retry=lambda status: retries.labels(str(status)).inc()
        )
