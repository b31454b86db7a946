"""``rdma``: Vortex frames over InfiniBand/RoCE verbs (extra ``rdma``: rdma-core's pyverbs).

This first part is the plugin's detection: it reports itself unavailable, with the
reason, when pyverbs is missing or the host has no RDMA device, and a daemon
configured with ``transports: [rdma, quic, tcp]`` then serves and uses the next
transport, logging why. The verbs data path (reliable-connected queue pairs,
registered memory regions, queue-pair endpoints exchanged through
``DfdaemonUpload.ExchangeIBVerbsQueuePairEndpoint``) is not written yet: this
machine's kernel has no RDMA at all, so ``serve`` and ``connect`` refuse plainly
even where a device exists, rather than run code that never ran on hardware.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, Transport
from damselfly.core.errors import Unavailable
from damselfly.hookspecs import hookimpl

SYSFS = Path("/sys/class/infiniband")


class RdmaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field("", description="Verbs device to use, e.g. mlx5_0 (empty: the first one found).")
    port_num: int = Field(1, ge=1, description="Port of the device.")
    gid_index: int = Field(0, ge=0, description="GID table index (RoCE v2 usually needs 3).")


def rdma_devices(sysfs: Path = SYSFS) -> list[str]:
    """The verbs devices the kernel lists, by name."""
    try:
        return sorted(p.name for p in sysfs.iterdir())
    except OSError:
        return []


def unavailable_reason(sysfs: Path = SYSFS) -> str | None:
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        return "pyverbs is not installed (pip install 'damselfly[rdma]'; it needs rdma-core's libibverbs)"
    if not sysfs.exists():
        return f"the kernel has no RDMA support ({sysfs} is absent)"
    if not rdma_devices(sysfs):
        return f"no RDMA device ({sysfs} is empty)"
    return "the verbs data path is not implemented yet (see the plugin's docstring)"


class RdmaTransport(Transport):
    name: ClassVar[str] = "rdma"
    Config = RdmaConfig
    options: RdmaConfig

    @classmethod
    def available(cls) -> str | None:
        return unavailable_reason()

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        raise Unavailable(f"rdma: {unavailable_reason()}")

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        raise Unavailable(f"rdma: {unavailable_reason()}")


@hookimpl
def damselfly_add_transports(registry):  # type: ignore[no-untyped-def]
    registry.add(RdmaTransport)
