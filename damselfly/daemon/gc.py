"""Garbage collection of a daemon's stored tasks: a TTL, and a quota with two watermarks.

Every ``daemon.gc.interval`` seconds (and on ``damselfly gc``):

0. a persistent cache task (``damselfly cache import``) goes when its own TTL
   ends, and never before, whatever the quota;
1. a task unused for ``task_ttl`` seconds goes (unused: not written, read, exported
   or served; the clock starts at the daemon's start for tasks found on disk);
2. if the stored bytes pass ``high_watermark`` percent of ``quota`` (or, with no
   quota, the data directory's filesystem is that full), the least recently used
   tasks go until usage is under ``low_watermark`` percent.

A task that is being downloaded, or that served a piece in the last
``serving_grace`` seconds, is never collected; if that leaves usage above the low
watermark, the report says so. Deleting goes through the daemon, so the scheduler
hears that this peer no longer has the task.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from damselfly.config import GcConfig
    from damselfly.contracts import Storage
    from damselfly.daemon.context import DeleteTask
    from damselfly.daemon.runtime import TaskBoard


@dataclass(frozen=True)
class GcContext:
    """What the collector needs of the daemon: its stored tasks, the downloads running, and
    deleting through it (so that the scheduler hears)."""

    storage: Storage
    board: TaskBoard
    delete_task: DeleteTask


@dataclass
class GcReport:
    removed: dict[str, str] = field(default_factory=dict)  # task id -> why
    freed_bytes: int = 0
    used_bytes: int = 0  # after the collection
    limit_bytes: int = 0  # the high watermark, in bytes
    kept_in_use: list[str] = field(default_factory=list)  # candidates spared because they are in use

    def to_dict(self) -> dict[str, object]:
        return {
            "removed": self.removed,
            "freed_bytes": self.freed_bytes,
            "used_bytes": self.used_bytes,
            "limit_bytes": self.limit_bytes,
            "kept_in_use": self.kept_in_use,
        }


class Collector:
    """Garbage collection of the stored tasks in ``data_dir``, by ``cfg``'s rules (above)."""

    def __init__(self, ctx: GcContext, cfg: GcConfig, data_dir: Path):
        self.ctx = ctx
        self.cfg = cfg
        self.data_dir = data_dir
        self.last_used: dict[str, float] = {}
        self.last_served: dict[str, float] = {}
        self.started = time.time()

    def touch(self, task_id: str) -> None:
        self.last_used[task_id] = time.time()

    def served(self, task_id: str) -> None:
        now = time.time()
        self.last_served[task_id] = now
        self.last_used[task_id] = now

    def used_at(self, task_id: str) -> float:
        task = self.ctx.storage.get(task_id)
        written = task.updated_at if task is not None else 0.0
        return max(self.last_used.get(task_id, 0.0), written, self.started)

    def in_use(self, task_id: str) -> bool:
        if self.ctx.board.running(task_id):
            return True
        return time.time() - self.last_served.get(task_id, 0.0) < self.cfg.serving_grace

    def _sizes(self) -> dict[str, int]:
        return {t.id: sum(p.length for p in t.pieces.values()) for t in self.ctx.storage.tasks()}

    def _limits(self, used: int) -> tuple[int, int, bool]:
        """(high, low) in bytes of our own content, and whether usage is over the high mark."""
        cfg = self.cfg
        if cfg.quota:
            high = int(cfg.quota * cfg.high_watermark / 100)
            low = int(cfg.quota * cfg.low_watermark / 100)
            return high, low, used > high
        disk = shutil.disk_usage(self.data_dir)
        others = disk.used - used  # what is on the disk that is not ours
        high = max(0, int(disk.total * cfg.high_watermark / 100) - others)
        low = max(0, int(disk.total * cfg.low_watermark / 100) - others)
        return high, low, disk.used > disk.total * cfg.high_watermark / 100

    async def collect(self) -> GcReport:
        report = GcReport()
        now = time.time()
        sizes = self._sizes()
        for task in self.ctx.storage.tasks():
            if task.expires_at and now > task.expires_at and not self.in_use(task.id):
                await self._remove(task.id, "its cache TTL ran out", sizes, report)
        pinned = {t.id for t in self.ctx.storage.tasks() if t.expires_at}  # persistent cache: kept until expiry
        for task_id in sorted(sizes, key=self.used_at):
            if task_id in pinned:
                continue
            if now - self.used_at(task_id) > self.cfg.task_ttl:
                if self.in_use(task_id):
                    report.kept_in_use.append(task_id)
                    continue
                await self._remove(task_id, f"unused for over {self.cfg.task_ttl:g}s", sizes, report)
        used = sum(sizes.values())
        high, low, over = self._limits(used)
        report.limit_bytes = high
        if over:
            for task_id in sorted(sizes, key=self.used_at):
                if used <= low:
                    break
                if task_id in pinned:
                    continue
                if self.in_use(task_id):
                    report.kept_in_use.append(task_id)
                    continue
                used -= sizes[task_id]
                await self._remove(task_id, "over the high watermark, least recently used", sizes, report)
        report.used_bytes = sum(sizes.values())
        if report.removed:
            logger.info("gc removed {} tasks, {} bytes freed", len(report.removed), report.freed_bytes)
        return report

    async def _remove(self, task_id: str, why: str, sizes: dict[str, int], report: GcReport) -> None:
        await self.ctx.delete_task(task_id)
        report.removed[task_id] = why
        report.freed_bytes += sizes.pop(task_id, 0)
        self.last_used.pop(task_id, None)
        self.last_served.pop(task_id, None)
