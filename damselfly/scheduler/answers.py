"""The scheduler's answers on an AnnouncePeer stream, and the encodings kept to make them fast.

A normal answer is assembled from encodings: the task's once per answer, each host's and
each parent's own fields as kept (about 60% of the cost of filling every parent in, task and
host copied into each); damselfly.rpc's server writes it as it is, anything else reads it as
a message. The kept encodings live here, keyed by the object they encode and dropped with
it, each with what it was made of, so a changed object is encoded again. Field numbers come
from the messages' descriptors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc
from dragonfly_api import common_pb2, scheduler_pb2

from damselfly.contracts import Candidate
from damselfly.core.host import Host
from damselfly.core.peer import Peer
from damselfly.rpc.wire import (
    host_to_proto,
    length_delimited,
    peer_own_bytes,
    piece_to_proto,
    set_time,
    source_share_to_proto,
    task_to_proto,
    varint,
)
from damselfly.scheduler.state import TaskEntry


def _number(message: Any, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[no-any-return]


NORMAL_TASK_RESPONSE = _number(scheduler_pb2.AnnouncePeerResponse, "normal_task_response")
CANDIDATE_PARENTS = _number(scheduler_pb2.NormalTaskResponse, "candidate_parents")
PEER_TASK = _number(common_pb2.Peer, "task")
PEER_HOST = _number(common_pb2.Peer, "host")
_PARENT_TAG = varint(CANDIDATE_PARENTS << 3 | 2)  # a candidate parent's tag (length-delimited), made once

_response_from = scheduler_pb2.AnnouncePeerResponse.FromString


class ScheduleError(Exception):
    """The end of a peer's stream with a gRPC status: the request cannot be served."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Encoded:
    """A normal answer as the scheduler assembled it, already encoded: damselfly.rpc's callback
    form writes the bytes as they are (no parse into a message and serialize back); anything
    else reads :attr:`message`."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    @property
    def message(self) -> scheduler_pb2.AnnouncePeerResponse:
        return decode(self.data)


Answer = scheduler_pb2.AnnouncePeerResponse | Encoded


def decode(data: bytes) -> scheduler_pb2.AnnouncePeerResponse:
    """An assembled answer as a message."""
    msg: scheduler_pb2.AnnouncePeerResponse = _response_from(data)
    return msg


def empty_task() -> scheduler_pb2.AnnouncePeerResponse:
    return scheduler_pb2.AnnouncePeerResponse(empty_task_response=scheduler_pb2.EmptyTaskResponse())


def back_to_source(why: str) -> scheduler_pb2.AnnouncePeerResponse:
    return scheduler_pb2.AnnouncePeerResponse(
        need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse(description=why)
    )


def metadata_only() -> scheduler_pb2.AnnouncePeerResponse:
    return scheduler_pb2.AnnouncePeerResponse(metadata_only_response=scheduler_pb2.MetadataOnlyResponse())


K = TypeVar("K")
V = TypeVar("V")


class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an object with something kept for it: the value, and the object's
    place in the table (dropped from it by the reference's callback)."""

    __slots__ = ("key", "value")
    key: int
    value: Any


class Kept(Generic[K, V]):
    """A value kept for each live object, dropped when the object goes (a weak reference's
    callback): keyed by ``id()``, which no other object has while this one lives. A read is a
    dict look-up (a WeakKeyDictionary makes a reference per read), the objects need no hash,
    and each entry is one more object for the garbage collector to scan (the reference, which
    holds the value); :attr:`find` is the look-up itself, for the hottest paths."""

    __slots__ = ("_drop", "_items", "find")

    def __init__(self) -> None:
        items: dict[int, _Ref] = {}

        def drop(ref: _Ref) -> None:
            if items.get(ref.key) is ref:
                del items[ref.key]

        self._items, self._drop = items, drop
        self.find: Callable[[int], _Ref | None] = items.get  # find(id(obj)).value: the value kept

    def get(self, obj: K) -> V | None:
        ref = self._items.get(id(obj))
        return None if ref is None else ref.value

    def put(self, obj: K, value: V) -> None:
        key = id(obj)
        ref = self._items.get(key)
        if ref is None:
            ref = self._items[key] = _Ref(obj, self._drop)
            ref.key = key
        ref.value = value

    def __len__(self) -> int:
        return len(self._items)


class _TaskKept:
    """A task's message as answers carry it, with what it was made of."""

    __slots__ = ("ident", "pb", "version")

    def __init__(self, ident: tuple[str, str, str, str], pb: common_pb2.Task):
        self.ident = ident
        self.pb = pb
        self.version = -1  # the entry's pieces_version its pieces are of (-1: none yet)


class Answers:
    """The encodings answers are made of, kept while what they encode stays the same."""

    def __init__(self) -> None:
        # each host's message and its encoding as a Peer message's host field, with the fields
        # they were made of (a host announced again is a new object: encoded again)
        self._hosts: Kept[Host, tuple[tuple[object, ...], common_pb2.Host, bytes]] = Kept()
        # each peer's own fields encoded, with what they were made of (a parent is named in
        # many answers; a finished one never changes)
        self._peers: Kept[Peer, tuple[tuple[object, ...], bytes]] = Kept()
        self._tasks: Kept[TaskEntry, _TaskKept] = Kept()
        # each host as it last announced itself (ListHosts shows it as it came)
        self.announced: Kept[Host, common_pb2.Host] = Kept()
        self._host_find, self._peer_find = self._hosts.find, self._peers.find

    def host_proto(self, h: Host) -> common_pb2.Host:
        """``host_to_proto(h)``, kept while the fields it carries stay the same."""
        return self._host(h)[1]

    def host_field(self, h: Host) -> bytes:
        """:meth:`host_proto` encoded as a Peer message's host field."""
        return self._host(h)[2]

    def _host(self, h: Host) -> tuple[tuple[object, ...], common_pb2.Host, bytes]:
        key = (
            h.type, h.hostname, h.ip, h.port, h.download_port, h.proxy_port, h.disable_shared,
            h.idc, h.location, h.max_tx_bandwidth, h.tx_bandwidth,
        )  # fmt: skip
        hit = self._host_find(id(h))
        if hit is not None and hit.value[0] == key:
            return hit.value  # type: ignore[no-any-return]
        pb = host_to_proto(h)
        kept = (key, pb, length_delimited(PEER_HOST, pb.SerializeToString()))
        self._hosts.put(h, kept)
        return kept

    def peer_part(self, p: Peer) -> bytes:
        """``peer_own_bytes(p)``, kept while the fields it carries stay the same."""
        key = (p.state, p.updated_at, p.priority, p.need_back_to_source, p.created_at)
        hit = self._peer_find(id(p))
        if hit is not None and hit.value[0] == key:
            return hit.value[1]  # type: ignore[no-any-return]
        part = peer_own_bytes(p)
        self._peers.put(p, (key, part))
        return part

    def task_proto(self, entry: TaskEntry) -> common_pb2.Task:
        """The task as answers carry it. One message, kept and brought up to date in place:
        callers copy it into their answer and must not change it."""
        t = entry.task
        ident = (t.url, t.digest, t.tag, t.application)
        kept = self._tasks.get(entry)
        if kept is None or kept.ident != ident:
            kept = _TaskKept(ident, task_to_proto(t, with_pieces=False))
            self._tasks.put(entry, kept)
        pb = kept.pb
        if kept.version != entry.pieces_version:  # the task's pieces in order, for every answer
            del pb.pieces[:]
            pb.pieces.extend(piece_to_proto(p) for p in sorted(t.pieces.values(), key=lambda p: p.number))
            kept.version = entry.pieces_version
        # the fields that change after registration (task_to_proto's values)
        pb.content_length = max(t.content_length, 0)
        pb.piece_count = t.piece_count
        pb.size_scope = common_pb2.EMPTY if t.content_length == 0 else common_pb2.NORMAL
        pb.state = t.state.value
        pb.peer_count = len(t.peer_ids)
        set_time(pb.updated_at, t.updated_at)
        return pb

    def host_as_announced(self, h: Host) -> common_pb2.Host:
        """``h`` as it announced itself, or as the scheduler knows it when it did not."""
        return self.announced.get(h) or host_to_proto(h)

    def normal(self, entry: TaskEntry, share: tuple[int, list[int]] | None, parents: list[Candidate]) -> bytes:
        """A NormalTaskResponse, encoded: a source share (its serial and pieces) when there is
        one, then ``parents``, each with the task and its host."""
        task_pb = self.task_proto(entry)
        task_field = length_delimited(PEER_TASK, task_pb.SerializeToString())
        out: list[bytes] = []
        if share is not None:
            share_pb = source_share_to_proto(share[0], share[1], entry.task, task_pb)
            out.append(length_delimited(CANDIDATE_PARENTS, share_pb.SerializeToString()))
        peer_part, host, tag = self.peer_part, self._host, _PARENT_TAG
        for c in parents:  # length_delimited(CANDIDATE_PARENTS, ...), its tag made once
            data = peer_part(c.peer) + task_field + host(c.host)[2]
            out.append(tag + varint(len(data)) + data)
        return length_delimited(NORMAL_TASK_RESPONSE, b"".join(out))
