"""Reads of the source: a new task's read shared among its first peers, and whose piece
digests the scheduler takes.

With ``scheduler.source_shares`` the seed and the peers waiting for it each read a block of
pieces nobody holds yet, so every host's link is busy from the start; a share whose reader
fails or leaves goes to another sharer. A piece's digest becomes the task's authoritative one
only from a peer the scheduler sent to the source (a seed's wins over a peer's).
"""

from __future__ import annotations

from dragonfly_api import common_pb2, scheduler_pb2
from loguru import logger

from damselfly.core.errors import InvalidArgument
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer
from damselfly.core.piece import share_blocks
from damselfly.rpc.wire import piece_from_proto, valid_piece_digest
from damselfly.scheduler.scheduling import Scheduling
from damselfly.scheduler.state import NOT_SENT, SEED, SENT_PEER, TaskEntry

_NORMAL_HOST = HostType.NORMAL


class SourceReads:
    """Who reads which pieces of a task from the source, and whose reports of them count."""

    def __init__(self, scheduling: Scheduling):
        self.scheduling = scheduling
        self.state = scheduling.state
        self.cfg = scheduling.cfg
        self.metrics = scheduling.metrics
        self.refused_digest = scheduling.metrics.refused.labels("digest")

    def plan(self, entry: TaskEntry, seed: Peer) -> scheduler_pb2.AnnouncePeerResponse | None:
        """Split the task's read of the source between its seed and the peers waiting for it.

        Every host's link is then busy from the start with pieces nobody else has, instead of
        all of them trailing the one link the seed reads the origin through. Each piece is
        still read once. None when there is nobody to share with: the seed reads it all.
        """
        if entry.shares_planned or not entry.task.known_length or entry.task.piece_count == 0:
            return None
        waiting = sorted((p for p, h in self._live_sharers(entry) if not h.is_seed), key=lambda p: p.id)
        if not waiting:
            return None
        unheld = self.unheld(entry)
        if not unheld:
            return None
        entry.shares_planned = True
        readers = [seed, *waiting]
        if self.cfg.source_share_readers:
            readers = readers[: self.cfg.source_share_readers]
        for p, part in zip(readers, share_blocks(len(unheld), len(readers)), strict=True):
            if part:
                block = unheld[part.start : part.stop]  # contiguous runs of what nobody holds yet
                entry.shares[p.id] = set(block)
                entry.untold[p.id] = set(block)
                self.metrics.source_share_pieces.labels("planned").inc(len(block))
        seed.need_back_to_source = False  # it reads its share and fetches the rest like any peer
        logger.info("task {}: the source read is shared among {} peers", entry.task.id[:12], len(readers))
        return self.scheduling.offer(entry, seed, [], [])

    def held(self, entry: TaskEntry, *, but: Peer | None = None) -> set[int]:
        """The pieces of the task its peers (``but`` one) hold."""
        out: set[int] = set()
        for pid in entry.task.peer_ids:
            p = self.state.peers.get(pid)
            if p is not None and p is not but:
                out |= p.finished_pieces
        return out

    def unheld(self, entry: TaskEntry) -> list[int]:
        """The task's pieces no peer of it holds, in order: what a shared read still has to read
        (after a scheduler restart, say, peers that hold the task announce it first)."""
        held = self.held(entry)
        return [n for n in range(entry.task.piece_count) if n not in held]

    def _live_sharers(self, entry: TaskEntry) -> list[tuple[Peer, Host]]:
        """The peers of the task that offered to read a share and are still downloading."""
        st = self.state
        live = []
        for pid in entry.sharers:
            p = st.peers.get(pid)
            h = st.hosts.get(p.host_id) if p is not None else None
            if p is not None and h is not None and not p.done:
                live.append((p, h))
        return live

    def hand_on(self, entry: TaskEntry, peer: Peer, why: str, *, gone: bool = False) -> None:
        """``peer`` will not read the rest of its share (it failed, or left): another sharer
        of the task takes it, the seed first; an answered one hears of it at once. When the
        peer is ``gone``, the pieces it read from the source that no other peer holds yet go
        too: nobody else can serve them, and waiting for a parent would stall every child."""
        left = entry.shares.pop(peer.id, set())
        entry.untold.pop(peer.id, None)
        entry.sharers.pop(peer.id, None)
        if gone and entry.shares_planned and peer.finished_pieces:
            left |= self._orphans(entry, peer)
        if not left:
            return
        heirs = [(not h.is_seed, len(entry.shares.get(p.id, ())), p.id, p) for p, h in self._live_sharers(entry)]
        if not heirs:
            logger.warning(
                "task {}: {} pieces of peer {}'s source share have nobody to read them ({})",
                entry.task.id[:12],
                len(left),
                peer.id,
                why,
            )
            return
        heir = min(heirs)[3]
        entry.shares.setdefault(heir.id, set()).update(left)
        entry.untold.setdefault(heir.id, set()).update(left)
        self.metrics.source_share_pieces.labels("handed_on").inc(len(left))
        logger.info(
            "task {}: {} pieces of {}'s source share go to {} ({})",
            entry.task.id[:12],
            len(left),
            peer.id,
            heir.id,
            why,
        )
        if heir.id in entry.answered:
            queue = entry.sharers[heir.id]
            queue.put_nowait(self.scheduling.offer(entry, heir, [], []))

    def _orphans(self, entry: TaskEntry, peer: Peer) -> set[int]:
        """The pieces ``peer`` holds that no other peer of the task holds or is to read."""
        held = self.held(entry, but=peer)
        for pid, share in entry.shares.items():
            if pid != peer.id:
                held |= share
        return peer.finished_pieces - held

    # -- whose digests count ---------------------------------------------------------------

    def rank(self, entry: TaskEntry, peer: Peer, number: int, share: set[int] | None) -> int:
        """Whose report of piece ``number`` read from the source ``peer``'s is (NOT_SENT,
        SENT_PEER, SEED): a seed host's peer; a peer the scheduler sent to the source or handed
        the piece in a share; anybody else, whose digests are not taken."""
        h = self.state.hosts.get(peer.host_id)
        if h is not None and h.type is not _NORMAL_HOST:
            return SEED
        if peer.id in entry.source_readers or (share is not None and number in share):
            return SENT_PEER
        return NOT_SENT

    def piece_read(self, entry: TaskEntry, peer: Peer, piece: common_pb2.Piece, share: set[int] | None) -> None:
        """A piece ``peer`` says it read from the source: its digest becomes the task's
        authoritative one only from a peer the scheduler sent there, well formed, and where the
        task's layout puts the piece. Others are ignored (logged once per peer)."""
        rank = self.rank(entry, peer, piece.number, share)
        why = ""
        if rank == NOT_SENT:
            why = "the scheduler did not send it to the source"
        elif piece.digest and not valid_piece_digest(piece.digest):
            why = f"digest {piece.digest[:80]!r} is not crc32:N, sha256:HEX or blake3:HEX"
        elif entry.task.known_length:
            try:
                span = entry.task.layout.span(piece.number)
            except InvalidArgument as exc:
                span, why = None, str(exc)
            if span is not None and (piece.offset, piece.length) != (span.offset, span.length):
                why = f"piece {piece.number} is not at {piece.offset}+{piece.length} in the task's layout"
        if why:
            self.refused_digest.inc()
            if peer.id not in entry.ignored_reporters:
                entry.ignored_reporters.add(peer.id)
                logger.warning("task {}: source piece reports of peer {} ignored: {}", entry.task.id[:12], peer.id, why)
            return
        entry.record_piece(piece_from_proto(piece), rank)
