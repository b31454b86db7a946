"""A whole swarm in one Python process: origin, scheduler, a seed and two peers.

    python examples/embed.py

This is the embedding API at its most direct: the same Daemon and scheduler the
CLI runs, configured with constructor arguments instead of YAML or env.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from pathlib import Path

from damselfly import Client
from damselfly.config import load_settings
from damselfly.daemon.daemon import Daemon
from damselfly.sandbox.origin import Origin, make_file
from damselfly.scheduler import start_scheduler


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="damselfly-embed-"))
    make_file(root / "model.bin", 32 << 20)
    origin = Origin(root)
    await origin.start()
    scheduler = await start_scheduler(load_settings())
    daemons = []
    for i, name in enumerate(["seed", "peer1", "peer2"]):
        settings = load_settings(
            host={"hostname": f"embed-{name}"},
            daemon={"seed": i == 0, "data_dir": str(root / name), "schedulers": [scheduler.address]},
            # the origin runs on this machine's loopback, which the source policy refuses by default
            security={"sources": {"allow_loopback": True}},
        )
        daemon = Daemon(settings)
        await daemon.start()
        daemons.append(daemon)
    try:
        want = hashlib.sha256((root / "model.bin").read_bytes()).hexdigest()
        for d in daemons[1:]:
            async with Client(d.socket_path) as client:
                out = root / f"{d.host_id}.bin"
                r = await client.download(origin.url("model.bin"), out, digest=f"sha256:{want}")
                print(
                    f"{d.host_id}: {r.content_length} bytes in {r.seconds:.2f}s "
                    f"(peers {r.peer_bytes}, source {r.source_bytes})"
                )
        print(f"origin sent {origin.stats.bytes_sent} bytes for a {32 << 20}-byte file")
    finally:
        for d in daemons:
            await d.stop()
        await scheduler.stop()
        await origin.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
