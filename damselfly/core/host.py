"""A host as the scheduler sees it: where a daemon lives and how loaded it is."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class HostType(enum.IntEnum):
    NORMAL = 0
    SUPER_SEED = 1
    STRONG_SEED = 2
    WEAK_SEED = 3

    @property
    def is_seed(self) -> bool:
        return self is not HostType.NORMAL


_NORMAL = HostType.NORMAL


# weakref_slot: the scheduler keeps a host's encoding for as long as the host lives (and no longer)
@dataclass(slots=True, weakref_slot=True)
class Host:
    id: str
    ip: str
    hostname: str
    port: int  # the DfdaemonUpload gRPC port
    type: HostType = HostType.NORMAL
    download_port: int = 0
    proxy_port: int = 0
    idc: str = ""
    location: str = ""
    max_tx_bandwidth: int = 0  # bits per second, as Dragonfly reports it
    tx_bandwidth: int = 0
    upload_content_length: int = 0
    concurrent_upload_pieces: int = 0
    disable_shared: bool = False
    announced_at: float = 0.0
    interval: float = 300.0
    peer_ids: set[str] = field(default_factory=set)

    @property
    def is_seed(self) -> bool:
        return self.type is not _NORMAL  # not HostType.NORMAL: an enum member lookup is slow in 3.11

    def expired(self, now: float) -> bool:
        return now - self.announced_at > 2 * self.interval
