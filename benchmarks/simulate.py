"""A fluid simulator of a swarm: pieces and links, driven by the same strategy and picker plugins.

    python benchmarks/simulate.py [--hosts 16] [--rate 50mbit] [--size 128MiB]
                                  [--strategy swarm] [--json]
    python benchmarks/simulate.py --hosts 1000 --size 100GiB      # where this machine cannot go

What it models, as benchmarks/swarm.py runs it: an origin with its own rate, a seed
and ``--hosts`` peers, each with an upload and a download rate; pieces of the length
the daemon would choose; every host starting at once. Each download follows the
settings of the chosen profile (``damselfly.testing.swarmconfig.PROFILES``): the
scheduler's strategy plugin ranks each peer's parents (``parent_limit`` of them,
a DAG or a mesh), the daemon's piece-picker plugin orders the missing pieces
(a seed counting half a holder), ``concurrent_pieces`` fetches run at once per
peer (``share_concurrent_pieces`` while it reads a share of the source) and
``seed_extra_pieces`` more from the seed (``fetch_slots``, as the daemon counts
them), a parent with ``upload_slots`` taken answers busy, a super-seeding seed
offers each piece to one child at a time (``SuperSeeder``, the class the seed
daemon runs), and the seed reads the origin
in ``source_concurrent_pieces`` long reads (``source_stream``) or one read per
piece. With the scheduler's ``source_shares`` the seed and every peer read a block
each (``share_blocks``, as the scheduler splits it: all peers are taken to be
waiting) and the seed fetches the rest from the peers that fetch from it. Peers
choose their fetches in a new random order each step. A piece is served on only
once it is whole.

Links are fluid: every ``--step`` seconds each transfer gets the smaller of its
parent's upload and its child's download, each shared equally among their
transfers, then what either side leaves unused is handed out again (a few rounds
of progressive filling). Rates are scaled by ``--efficiency`` (tc counts whole
frames: payload is about 0.956 of the link) and each fetch starts ``--latency``
seconds after it is chosen (request, lookup, the first bytes). No CPU limit is
modelled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damselfly.config import DaemonConfig, Settings
from damselfly.contracts import Candidate
from damselfly.core.host import Host, HostType
from damselfly.core.peer import Peer, PeerState
from damselfly.core.piece import piece_length_for, share_blocks
from damselfly.core.task import Task
from damselfly.core.units import format_size, parse_size
from damselfly.daemon.planner import fetch_slots, source_runs
from damselfly.daemon.superseed import SuperSeeder
from damselfly.plugin_manager import build_plugins
from damselfly.testing import netns, swarmconfig

SEED_HOLDER = 0.5  # as the daemon's fetch loop counts a seed
BUSY_BACKOFF = 0.2  # as DaemonConfig.busy_backoff


@dataclass
class Node:
    idx: int
    name: str
    up: float  # bytes/s
    down: float
    is_seed: bool = False
    have: set[int] = field(default_factory=set)
    parents: list[int] = field(default_factory=list)
    fetching: dict[int, list[int]] = field(default_factory=dict)  # piece -> transfer ids (endgame: several)
    uploading: int = 0
    busy_until: dict[int, float] = field(default_factory=dict)  # parent -> when to ask again
    done_at: float = 0.0
    dirty: bool = True  # something it could act on changed since it last chose fetches
    wake_at: float = float("inf")  # a busy parent may have a slot then


@dataclass
class Profile:
    strategy: str
    picker: str
    concurrent: int
    upload_slots: int
    seed_upload_slots: int
    super_seed: bool
    source_concurrent: int
    seed_extra: int = 0  # fetches from the seed a peer may run beyond ``concurrent``
    source_stream: bool = False  # the seed reads the whole task from the source in one request
    source_shares: bool = False  # the seed and the peers each read a block of the source (scheduler)
    seed_concurrent: int = 4  # the seed's concurrent_pieces: its fetches from peers (with shares)
    peer_source_concurrent: int = 4  # a peer's source_concurrent_pieces (or concurrent_pieces)
    peer_source_stream: bool = True
    offer_timeout: float = 2.0
    offers_per_child: int = 1
    endgame: int = 0  # duplicate fetches per piece once every missing piece is in flight
    busy_backoff: float = BUSY_BACKOFF
    share_concurrent: int = 0  # a peer's share_concurrent_pieces: its fetches while it reads a share
    share_readers: int = 0  # the scheduler's source_share_readers: at most this many read a block (0: all)


def _settings(env: dict[str, str]) -> Settings:
    """The settings a process started with ``env`` (over no other DAMSELFLY_ variables) runs with."""
    from unittest import mock

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return Settings()


def profile_settings(name: str) -> Profile:
    """A lab profile's settings as the daemons and the scheduler resolve them (defaults included)."""
    p = swarmconfig.PROFILES[name]
    sched = _settings(p.scheduler_env).scheduler
    peer = _settings(p.daemon_env).daemon
    seed = _settings({**p.daemon_env, **(p.seed_env or {}), "DAMSELFLY_DAEMON__SEED": "true"}).daemon
    return Profile(
        strategy=sched.strategy,
        picker=peer.piece_picker,
        concurrent=peer.concurrent_pieces,
        upload_slots=peer.upload_slots,
        seed_upload_slots=seed.upload_slots,
        super_seed=seed.super_seed,
        source_concurrent=seed.source_concurrent_pieces,  # 0: by the size of the read, as the daemon does
        seed_extra=peer.seed_extra_pieces,
        source_stream=seed.source_stream,
        offer_timeout=seed.offer_timeout,
        offers_per_child=seed.offers_per_child,
        endgame=peer.endgame_duplicates,
        busy_backoff=peer.busy_backoff,
        share_concurrent=peer.share_concurrent_pieces,
        seed_concurrent=seed.concurrent_pieces,
        source_shares=sched.source_shares,
        share_readers=sched.source_share_readers,
        peer_source_concurrent=peer.source_concurrent_pieces,
        peer_source_stream=peer.source_stream,
    )


class Simulation:
    ORIGIN = -1

    def __init__(self, args: argparse.Namespace, prof: Profile):
        self.args = args
        self.prof = prof
        self.size = parse_size(args.size)
        self.piece = args.piece_length or piece_length_for(self.size)
        self.count = -(-self.size // self.piece)
        eff = args.efficiency
        rate = swarmconfig.parse_bits(args.rate) / 8 * eff
        seed_rate = (
            (swarmconfig.parse_bits(args.seed_rate) if args.seed_rate else swarmconfig.parse_bits(args.rate)) / 8 * eff
        )
        self.origin_rate = swarmconfig.parse_bits(args.origin_rate) / 8 * eff
        self.nodes = [Node(0, "seed", seed_rate, seed_rate, is_seed=True)]
        self.nodes += [Node(i, f"h{i}", rate, rate) for i in range(1, args.hosts + 1)]
        plugins = build_plugins(Settings())
        self.strategy = plugins.make_strategy(prof.strategy)
        self.picker = plugins.make_picker(prof.picker)
        self.seeder = (
            SuperSeeder(self.count, offer_timeout=prof.offer_timeout, per_child=prof.offers_per_child)
            if prof.super_seed
            else None
        )
        # how many fetches a node runs, counted as the daemon's fetch loop counts them
        self.peer_slots = DaemonConfig(
            concurrent_pieces=prof.concurrent,
            seed_extra_pieces=prof.seed_extra,
            share_concurrent_pieces=prof.share_concurrent,
        )
        self.seed_slots = DaemonConfig(concurrent_pieces=prof.seed_concurrent)
        self.rng = random.Random(args.seed)
        random.seed(args.seed)
        # transfers, as parallel arrays: parent, child, piece, bytes left, start time
        self.t_parent: list[int] = []
        self.t_child: list[int] = []
        self.t_piece: list[int] = []
        self.t_left: list[float] = []
        self.t_start: list[float] = []
        self.active: set[int] = set()
        self.origin_bytes = 0
        self.seed_sent = 0
        # reads of the source, as the daemons run them: per node, runs waiting and runs under way
        # (what is left of each); the run each source transfer belongs to
        self.source_waiting: dict[int, list[list[int]]] = {}
        self.source_running: dict[int, list[list[int]]] = {}
        self.t_run: dict[int, list[int]] = {}
        self.source_width: dict[int, int] = {}

    # -- the scheduler's choice of parents, through the strategy plugin -----------------

    def _core(self, n: Node) -> Candidate:
        host = Host(
            id=n.name,
            ip="10.0.0.1",
            hostname=n.name,
            port=1,
            type=HostType.SUPER_SEED if n.is_seed else HostType.NORMAL,
            max_tx_bandwidth=int(n.up * 8),
        )
        state = PeerState.BACK_TO_SOURCE if n.is_seed else PeerState.RUNNING
        peer = Peer(id=n.name, task_id="t", host_id=n.name, state=state, finished_pieces=set(n.have))
        return Candidate(peer, host)

    def assign_parents(self) -> None:
        cfg = Settings().scheduler
        limit = self.strategy.parent_limit or cfg.candidate_parent_limit
        task = Task(id="t", content_length=self.size, piece_length=self.piece)
        order = list(range(1, len(self.nodes)))
        self.rng.shuffle(order)  # the order peers register in
        registered: list[int] = [0]
        below: dict[int, set[int]] = {i: set() for i in range(len(self.nodes))}
        for i in order:
            pool = [j for j in registered if self.strategy.dag is False or i not in below[j]]
            pool = self.rng.sample(pool, min(len(pool), max(cfg.filter_parent_limit, limit)))
            ranked = self.strategy.rank(self._core(self.nodes[i]), [self._core(self.nodes[j]) for j in pool], task)
            names = {n.name: n.idx for n in self.nodes}
            chosen = [names[c.host.id] for c in ranked[:limit]]
            self.nodes[i].parents = chosen
            if self.strategy.dag:
                for j in chosen:  # i and all below it are below each new parent and its ancestors
                    below[j].add(i)
            registered.append(i)
        if not self.strategy.dag:
            # the scheduler's refresh later offers every peer the others too, up to the limit
            for i in order:
                n = self.nodes[i]
                extra = [j for j in order if j != i and j not in n.parents]
                self.rng.shuffle(extra)
                n.parents += extra[: max(0, limit - len(n.parents))]
            # and offers each peer back the peers that fetch from it (a mesh is symmetric)
            for i in order:
                for j in order:
                    if i != j and i in self.nodes[j].parents and j not in self.nodes[i].parents:
                        self.nodes[i].parents.append(j)

    # -- one step ------------------------------------------------------------------------

    def plan_source(self) -> None:
        """Who reads which pieces of the source: the seed all of them, or with source_shares the
        seed and every peer (all waiting when the seed registers) a block each, the seed first."""
        readers = list(range(len(self.nodes))) if self.prof.source_shares else [0]
        if self.prof.share_readers:
            readers = readers[: self.prof.share_readers]
        for i, block in zip(readers, share_blocks(self.count, len(readers)), strict=True):
            seed = i == 0
            stream = self.prof.source_stream if seed else self.prof.peer_source_stream
            fixed = self.prof.source_concurrent if seed else self.prof.peer_source_concurrent
            width = DaemonConfig(source_concurrent_pieces=fixed).source_reads(len(block) * self.piece)
            self.source_waiting[i] = source_runs(list(block), width) if stream else [[n] for n in block]
            self.source_running[i] = []
            self.source_width[i] = width

    def read_source(self, now: float) -> None:
        for i, waiting in self.source_waiting.items():
            running = self.source_running[i]
            while waiting and len(running) < self.source_width[i]:
                run = waiting.pop(0)
                running.append(run)
                self.start(self.ORIGIN, i, run[0], now, run=run)

    def start(self, parent: int, child: int, piece: int, now: float, run: list[int] | None = None) -> None:
        tid = len(self.t_parent)
        self.t_parent.append(parent)
        self.t_child.append(child)
        self.t_piece.append(piece)
        self.t_left.append(float(self.piece_len(piece)))
        # a long read of the source waits for its first bytes once, not once per piece
        streamed = run is not None and piece != run[0]
        if run is not None:
            self.t_run[tid] = run
        self.t_start.append(now + (0.0 if streamed else self.args.latency))
        self.active.add(tid)
        self.nodes[child].fetching.setdefault(piece, []).append(tid)
        if parent >= 0:
            self.nodes[parent].uploading += 1

    def piece_len(self, n: int) -> int:
        return min(self.piece, self.size - n * self.piece)

    def schedule(self, now: float) -> None:
        seed = self.nodes[0]
        self.read_source(now)
        if self.seeder is not None:
            for child in self.seeder.sync(seed.have, now):
                self.nodes[child].dirty = True
        # with shares the seed fetches the others' blocks from the peers like any peer; peers
        # choose in a new random order each step, as their requests reach the parents in no set order
        order = self.nodes[:] if self.prof.source_shares else self.nodes[1:]
        self.rng.shuffle(order)
        for n in order:
            if n.done_at:
                continue
            tids = [tid for ts in n.fetching.values() for tid in ts if self.t_parent[tid] != self.ORIGIN]
            seed_fetches = sum(1 for tid in tids if self.t_parent[tid] == 0)
            slots_cfg = self.seed_slots if n.is_seed else self.peer_slots
            sharing = self.prof.source_shares and bool(self.reading(n.idx))
            if fetch_slots(len(tids), seed_fetches, slots_cfg, sharing=sharing)[1]:
                continue
            if self.args.fast and not n.dirty and now < n.wake_at:
                continue  # nothing it could act on changed: it would choose nothing new
            n.dirty, n.wake_at = False, float("inf")
            missing = set(range(self.count)) - n.have - self.reading(n.idx)
            if not missing:
                continue
            holders: dict[int, float] = {}
            views: dict[int, set[int]] = {}
            for j in n.parents:
                p = self.nodes[j]
                view = views[j] = self.seeder.visible(n.idx, p.have) if p.is_seed and self.seeder else p.have
                for k in view & missing:
                    holders[k] = holders.get(k, 0) + (SEED_HOLDER if p.is_seed else 1)
            load: dict[int, int] = {}
            for tid in tids:
                load[self.t_parent[tid]] = load.get(self.t_parent[tid], 0) + 1
            # the missing pieces not in flight, rarest first; then, in endgame, those in flight
            # longest, from one more holder each
            order = self.picker.order(set(holders) - set(n.fetching), holders)
            if self.prof.endgame and not order:
                oldest = {k: min(self.t_start[t] for t in ts) for k, ts in n.fetching.items()}
                order = sorted((k for k in n.fetching if len(n.fetching[k]) <= self.prof.endgame), key=oldest.get)
            for k in order:
                ordinary_full, full = fetch_slots(len(tids), seed_fetches, slots_cfg, sharing=sharing)
                if full:
                    break
                already = {self.t_parent[t] for t in n.fetching.get(k, [])}
                options = [j for j in n.parents if k in views[j] and n.busy_until.get(j, 0) <= now and j not in already]
                if ordinary_full:  # only the extra fetch from the seed is left
                    options = [j for j in options if self.nodes[j].is_seed]
                if not options:
                    continue
                fewest = min(load.get(j, 0) for j in options)
                j = self.rng.choice([j for j in options if load.get(j, 0) == fewest])
                p = self.nodes[j]
                slots = self.prof.seed_upload_slots if p.is_seed else self.prof.upload_slots
                if slots and p.uploading >= slots:
                    n.busy_until[j] = now + self.prof.busy_backoff
                    n.wake_at = min(n.wake_at, now + self.prof.busy_backoff)
                    continue
                if p.is_seed:
                    self.seed_sent += self.piece_len(k)
                    seed_fetches += 1
                    if self.seeder is not None:
                        self.seeder.taken(k)
                load[j] = load.get(j, 0) + 1
                self.start(j, n.idx, k, now)
                tids.append(len(self.t_parent) - 1)

    def flow(self, dt: float, now: float) -> None:
        ids = [t for t in self.active if self.t_start[t] <= now]
        if not ids:
            return
        parent = np.array([self.t_parent[t] for t in ids])
        child = np.array([self.t_child[t] for t in ids])
        n_nodes = len(self.nodes)
        up = np.array([n.up for n in self.nodes] + [self.origin_rate])  # the origin is the last index
        down = np.array([n.down for n in self.nodes] + [0.0])
        pi = np.where(parent < 0, n_nodes, parent)
        rate = np.zeros(len(ids))
        up_left, down_left = up.copy(), down.copy()
        open_ = np.ones(len(ids), dtype=bool)
        for _ in range(4):  # progressive filling: share what is left among the transfers not yet capped
            if not open_.any():
                break
            n_up = np.bincount(pi[open_], minlength=n_nodes + 1)
            n_down = np.bincount(child[open_], minlength=n_nodes + 1)
            share = np.minimum(up_left[pi] / np.maximum(n_up[pi], 1), down_left[child] / np.maximum(n_down[child], 1))
            share[~open_] = 0
            rate += share
            np.subtract.at(up_left, pi, share)
            np.subtract.at(down_left, child, share)
            open_ &= (up_left[pi] > 1e-6) & (down_left[child] > 1e-6)
        for t, r in zip(ids, rate, strict=True):
            moved = min(r * dt, max(self.t_left[t], 0.0))  # a transfer's last step moves only what is left
            self.t_left[t] -= r * dt
            if self.t_parent[t] < 0:
                self.origin_bytes += int(moved)
            if self.t_left[t] <= 0 and t in self.active:  # not an endgame loser ended this step
                self.finish(t, now + dt)

    def _end(self, t: int) -> None:
        """Transfer ``t`` ends (done, or cancelled as an endgame loser): its parent's slot frees."""
        self.active.discard(t)
        p = self.t_parent[t]
        if p >= 0:
            self.nodes[p].uploading -= 1
            for j in self.children_of[p]:
                self.nodes[j].dirty = True  # a slot there is free
        if p == 0 and self.seeder is not None:
            self.seeder.done(self.t_piece[t])

    def reading(self, i: int) -> set[int]:
        """The pieces node ``i`` will read from the source, or is reading."""
        runs = self.source_waiting.get(i, []) + self.source_running.get(i, [])
        return {n for run in runs for n in run}

    def finish(self, t: int, now: float) -> None:
        c, k = self.nodes[self.t_child[t]], self.t_piece[t]
        run = self.t_run.pop(t, None)
        if run is not None:  # the long read goes on with its next piece, without a new request
            run.pop(0)
            if run:
                self.start(self.ORIGIN, c.idx, run[0], now, run=run)
            else:
                self.source_running[c.idx].remove(run)
        self._end(t)
        c.dirty = True
        for j in self.children_of[c.idx]:
            self.nodes[j].dirty = True  # a parent of theirs has a new piece
        for loser in c.fetching.pop(k):
            if loser != t and loser in self.active:
                self._end(loser)  # endgame: the other fetches of this piece are cancelled
        c.have.add(k)
        if len(c.have) == self.count and not c.done_at:
            c.done_at = now
            if self.seeder is not None and not c.is_seed:
                self.seeder.leave(c.idx)

    def run(self) -> dict[str, float | list[float]]:
        self.assign_parents()
        self.plan_source()
        if self.prof.source_shares:
            # the seed's refresh offers it the peers that fetch from it, as it fetches too
            self.nodes[0].parents = [i for i in range(1, len(self.nodes)) if 0 in self.nodes[i].parents]
        self.children_of: dict[int, list[int]] = {n.idx: [] for n in self.nodes}
        for n in self.nodes:
            for j in n.parents:
                self.children_of[j].append(n.idx)
        if self.seeder is not None:
            for j in self.children_of[0]:
                self.seeder.join(j, range(self.count))
        now, dt = 0.0, self.args.step
        while not all(n.done_at for n in self.nodes[1:]):
            self.schedule(now)
            self.flow(dt, now)
            now += dt
            if now > self.args.max_seconds:
                raise SystemExit(f"not done after {self.args.max_seconds:.0f} simulated seconds")
        return {"seconds": [n.done_at for n in self.nodes[1:]]}


def summary(cfg: swarmconfig.SwarmConfig, times: list[float], origin: int, seed_sent: int, size: int) -> dict:
    t_min = cfg.t_min()
    return {
        "t_min_seconds": round(t_min, 3),
        "p50_seconds": round(swarmconfig.quantile(times, 0.5), 2),
        "max_seconds": round(max(times), 2),
        "p50_ratio": round(swarmconfig.quantile(times, 0.5) / t_min, 3),
        "p90_ratio": round(swarmconfig.quantile(times, 0.9) / t_min, 3),
        "max_ratio": round(max(times) / t_min, 3),
        "origin_ratio": round(origin / size, 3),
        "seed_upload_ratio": round(seed_sent / size, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--seed-rate", default="")
    ap.add_argument("--origin-rate", default="400mbit")
    ap.add_argument("--size", default="128MiB")
    ap.add_argument("--strategy", default="out-of-box", help=f"a profile of {', '.join(swarmconfig.PROFILES)}")
    ap.add_argument("--step", type=float, default=0.0, help="seconds per step (default: a 20th of a piece's time)")
    ap.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="payload / link rate (default: what TCP over an MTU of --mtu leaves, 0.956 at 1500)",
    )
    ap.add_argument("--mtu", type=int, default=0, help="the links' MTU (default: the --measured run's, else 1500)")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds from choosing a fetch to its first byte")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument(
        "--fast",
        action="store_true",
        help="a peer chooses fetches only after an event that concerns it (big projections), not every step",
    )
    ap.add_argument(
        "--piece-length", type=parse_size, default=0, help="coarser pieces for big projections (default: the daemon's)"
    )
    ap.add_argument("--max-seconds", type=float, default=1e7)
    ap.add_argument("--concurrent", type=int, help="override the profile's concurrent_pieces")
    ap.add_argument("--seed-concurrent", type=int, help="override the seed's concurrent_pieces")
    ap.add_argument("--upload-slots", type=int, help="override the peers' upload_slots")
    ap.add_argument("--seed-upload-slots", type=int, help="override the seed's upload_slots")
    ap.add_argument("--source-concurrent", type=int, help="override the seed's source_concurrent_pieces")
    ap.add_argument("--seed-extra", type=int, help="override the peers' seed_extra_pieces")
    ap.add_argument("--busy-backoff", type=float, help="override the peers' busy_backoff")
    ap.add_argument("--offers-per-child", type=int, help="override the seed's offers_per_child")
    ap.add_argument("--share-concurrent", type=int, help="override the peers' share_concurrent_pieces")
    ap.add_argument("--endgame", type=int, help="override the peers' endgame_duplicates")
    ap.add_argument("--share-readers", type=int, help="override the scheduler's source_share_readers")
    ap.add_argument("--source-stream", type=int, choices=(0, 1), help="override source_stream (1: long reads)")
    ap.add_argument("--measured", default="", help="benchmarks/swarm.py --json output to compare with")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    prof = profile_settings(args.strategy)
    for key in (
        "concurrent",
        "seed_concurrent",
        "upload_slots",
        "seed_upload_slots",
        "source_concurrent",
        "seed_extra",
        "busy_backoff",
        "source_stream",
        "offers_per_child",
        "endgame",
        "share_concurrent",
        "share_readers",
    ):
        if getattr(args, key) is not None:
            setattr(prof, key, getattr(args, key))
    size = parse_size(args.size)
    rate = swarmconfig.parse_bits(args.rate)
    # the last line of swarm.py --json's output
    measured_run = json.loads(Path(args.measured).read_text().strip().splitlines()[-1]) if args.measured else {}
    if args.efficiency is None:
        args.efficiency = netns.payload_share(args.mtu or measured_run.get("mtu", 1500))
    if not args.step:
        args.step = (args.piece_length or piece_length_for(size)) * 8 / rate / 20
    cfg = swarmconfig.SwarmConfig(
        hosts=args.hosts,
        rate_bits=rate,
        seed_rate_bits=swarmconfig.parse_bits(args.seed_rate) if args.seed_rate else 0,
        origin_rate_bits=swarmconfig.parse_bits(args.origin_rate),
        size=size,
    )
    t0 = time.monotonic()
    sim = Simulation(args, prof)
    times = sim.run()["seconds"]
    assert isinstance(times, list)
    result = {
        "strategy": args.strategy,
        "hosts": args.hosts,
        "rate": args.rate,
        "size": args.size,
        "piece_length": sim.piece,
        **summary(cfg, times, sim.origin_bytes, sim.seed_sent, size),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    if args.measured:
        measured = measured_run["strategies"][args.strategy]
        result["measured_p50_ratio"] = measured["p50_ratio"]
        result["measured_max_ratio"] = measured["max_ratio"]
        result["p50_error"] = round(result["p50_ratio"] / measured["p50_ratio"] - 1, 3)
        result["max_error"] = round(result["max_ratio"] / measured["max_ratio"] - 1, 3)
    print(
        f"{args.strategy}: {args.hosts} hosts at {args.rate}, F = {args.size} (pieces of {format_size(sim.piece)}): "
        f"T_min {result['t_min_seconds']:.1f} s, p50 {result['p50_ratio']:.3f}, p90 {result['p90_ratio']:.3f}, "
        f"max {result['max_ratio']:.3f} x T_min; origin {result['origin_ratio']:.2f} x F, "
        f"seed sent {result['seed_upload_ratio']:.2f} x F"
    )
    if args.measured:
        print(
            f"measured: p50 {result['measured_p50_ratio']:.3f}, max {result['measured_max_ratio']:.3f} "
            f"(error {result['p50_error']:+.1%}, {result['max_error']:+.1%})"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
