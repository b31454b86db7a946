"""The scheduler service: ``scheduler.v2.Scheduler`` over gRPC, in rooms that each lean only
on the ones listed before them.

- ``state``: hosts, tasks and peers, and which peers can serve a peer (plain logic, no protobuf);
- ``answers``: the answers on an AnnouncePeer stream, and the encodings kept to make them fast;
- ``preheat``: images and files put on chosen hosts before anyone asks;
- ``scheduling``: parents or the source for each peer, the seed trigger, more parents later;
- ``shares``: a new task's source read shared among its first peers; whose digests count;
- ``access``: who may ask what (certificates, task ids, caps);
- ``session``: one AnnouncePeer stream;
- ``servicer``: the gRPC door, and :func:`start_scheduler`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from damselfly.scheduler.servicer import SchedulerServer, SchedulerService, start_scheduler

__all__ = ["SchedulerServer", "SchedulerService", "start_scheduler"]


def __getattr__(name: str) -> Any:
    """The service's names, imported on first use: importing one room (``state``, say) does not
    import the whole service."""
    if name in __all__:
        from damselfly.scheduler import servicer

        return getattr(servicer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
