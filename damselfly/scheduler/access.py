"""Who may ask the scheduler what: callers, their hosts, their task ids, and the caps.

With ``security.tls`` every caller shows a certificate of the cluster CA and acts only for
its own hosts (a host announces only itself; a seed only with a ``seed`` certificate);
operators' requests need an operator's role. A peer registers only under its Download's own
task id. Caps (``security.limits``) bound hosts, tasks and peers. Each refusal is counted.
"""

from __future__ import annotations

import grpc
from dragonfly_api import common_pb2

from damselfly.config import Settings
from damselfly.core import ids
from damselfly.core.errors import InvalidArgument
from damselfly.core.host import HostType
from damselfly.rpc.wire import download_task_id
from damselfly.scheduler.answers import ScheduleError
from damselfly.scheduler.state import SchedulerState
from damselfly.security.identity import PeerIdentity, identity_of
from damselfly.telemetry.metrics import SchedulerMetrics

# Under mutual TLS, the certificate roles that may preheat: an operator's tool (`damselfly
# certs issue --role client`), not any cluster member.
OPERATOR_ROLES = frozenset({"client"})


def who(ident: PeerIdentity) -> str:
    """A certificate's holder in a message: its common name and addresses."""
    names = sorted(ident.ips | ident.dns)
    return f"{ident.common_name or '?'} [{', '.join(names)}]"


class Access:
    """The scheduler's admission checks; each raises :class:`ScheduleError` to refuse."""

    def __init__(self, settings: Settings, state: SchedulerState, metrics: SchedulerMetrics):
        self.state = state
        self.limits = settings.security.limits
        # with mutual TLS every caller has a certificate, and may act only for its own hosts
        self.tls = settings.security.tls.enabled
        # (refused digests are counted where they are judged: SourceReads)
        self.refused = {k: metrics.refused.labels(k) for k in ("limit", "permission", "task_id")}

    def identity(self, context: object) -> PeerIdentity | None:
        """The caller's certificate identity; None without TLS (nobody is authenticated).
        Under TLS a caller with none is refused (the server requires client certificates)."""
        if not self.tls:
            return None
        ident = identity_of(context)
        if ident is None:
            self.refused["permission"].inc()
            raise ScheduleError(grpc.StatusCode.PERMISSION_DENIED, "a client certificate is required (mutual TLS)")
        return ident

    def owns_host(self, ident: PeerIdentity, host_id: str) -> bool:
        """``host_id`` is a host of the certificate's holder: announced with addresses the
        certificate names or, not known (any more), one of the ids those addresses make."""
        h = self.state.hosts.get(host_id)
        if h is not None:
            return ident.may_be_host(h.ip, h.hostname)
        names = set(ident.dns) | ({ident.common_name} if ident.common_name else set())
        return any(
            host_id == ids.host_id(ip, name, seed=seed) for ip in ident.ips for name in names for seed in (False, True)
        )

    def check_owner(self, ident: PeerIdentity | None, host_id: str, what: str) -> None:
        if ident is not None and not self.owns_host(ident, host_id):
            self.refused["permission"].inc()
            raise ScheduleError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what}: host {host_id} is not the caller's ({who(ident)}); only its owner may",
            )

    def check_operator(self, ident: PeerIdentity | None, what: str) -> None:
        """Refuse a caller whose certificate has no operator's role (anyone may without TLS)."""
        if ident is not None and not ident.roles & OPERATOR_ROLES:
            self.refused["permission"].inc()
            raise ScheduleError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what} is an operator's request: the caller's certificate ({who(ident)}) has no role "
                f"{' or '.join(sorted(OPERATOR_ROLES))}",
            )

    def check_announce(self, ident: PeerIdentity, pb: common_pb2.Host) -> None:
        """A host announces only itself: its ip and hostname named by the certificate, its id the
        one they make, and a seed type only with a ``seed`` certificate."""
        seed = pb.type != HostType.NORMAL
        why = ""
        if not ident.may_be_host(pb.ip, pb.hostname):
            why = f"the certificate ({who(ident)}) does not name ip {pb.ip} and hostname {pb.hostname}"
        elif seed and not ident.is_seed:
            why = "only a certificate with role seed may announce a seed host"
        elif pb.id != (expected := ids.host_id(pb.ip, pb.hostname, seed=seed)):
            why = f"host id {pb.id} is not {expected}, the id of ip {pb.ip} and hostname {pb.hostname}"
        if why:
            self.refused["permission"].inc()
            raise ScheduleError(grpc.StatusCode.PERMISSION_DENIED, f"AnnounceHost refused: {why}")

    def check_task_id(self, task_id: str, download: common_pb2.Download) -> None:
        """A peer registers under its Download's own task id (``wire.download_task_id``, what a
        daemon computes from the same request), never one it names: otherwise a peer could put
        one URL's bytes, and their piece digests, under another URL's task."""
        try:
            expected = download_task_id(download)
        except InvalidArgument as exc:
            self.refused["task_id"].inc()
            raise ScheduleError(grpc.StatusCode.INVALID_ARGUMENT, f"register refused: {exc}") from None
        if task_id != expected:
            self.refused["task_id"].inc()
            raise ScheduleError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"register refused: task id {task_id[:128]!r} is not its download's ({expected})",
            )

    def over_limit(self, what: str, limit: int) -> ScheduleError:
        self.refused["limit"].inc()
        return ScheduleError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the scheduler holds its maximum of {limit} {what} (security.limits.max_{what}); no new one is taken",
        )

    def check_room(self, *, hosts: str = "", tasks: str = "", peers: str = "") -> None:
        """Refuse a new host, task or peer (named; '' for none) when the state holds its cap."""
        st, limits = self.state, self.limits
        if hosts and hosts not in st.hosts and len(st.hosts) >= limits.max_hosts:
            raise self.over_limit("hosts", limits.max_hosts)
        if tasks and tasks not in st.tasks and len(st.tasks) >= limits.max_tasks:
            raise self.over_limit("tasks", limits.max_tasks)
        if peers and peers not in st.peers and len(st.peers) >= limits.max_peers:
            raise self.over_limit("peers", limits.max_peers)
