"""Transports in a real swarm: negotiation, fallback, and whole downloads over QUIC."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from damselfly.sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MiB = 1 << 20
QUIC = {"type": "quic", "max_datagram_size": 8192}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def transports(*choices) -> dict[str, str]:
    return {"DAMSELFLY_DAEMON__TRANSPORTS": json.dumps(list(choices))}


# the seed reads the whole task (no shared source read), so that every byte a peer gets crosses a transport
SEED_READS = {"DAMSELFLY_SCHEDULER__SOURCE_SHARES": "false"}


async def download(cluster, name, url, out):
    async with Client(cluster.daemon(name)["socket"]) as c:
        return await c.download(url, out)


async def test_children_use_their_first_transport_the_parent_serves(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    """The seed serves quic and tcp; peer1 prefers quic, peer2 speaks only tcp."""
    src = damselfly_origin.make("f.bin", 24 * MiB)
    cluster = damselfly_cluster_factory(
        peers=2,
        peer_env={
            0: transports(QUIC, {"type": "tcp"}),
            1: transports(QUIC, {"type": "tcp"}),
            2: transports({"type": "tcp"}),
        },
        env=SEED_READS,
    )
    url = damselfly_origin.url("f.bin")
    await download(cluster, "peer1", url, tmp_path / "o1")  # from the seed alone: over quic
    await download(cluster, "peer2", url, tmp_path / "o2")  # from the seed and peer1: over tcp
    assert sha(tmp_path / "o1") == sha(tmp_path / "o2") == sha(src)
    metric = "dragonfly_dfdaemon_download_transport_bytes_total"
    assert cluster.metric("peer1", metric, '{transport="quic"}') == 24 * MiB
    assert cluster.metric("peer1", metric, '{transport="tcp"}') == 0
    # peer2 speaks only tcp, which both its parents serve beside quic
    assert cluster.metric("peer2", metric, '{transport="tcp"}') == 24 * MiB
    assert cluster.metric("peer2", metric, '{transport="quic"}') == 0
    assert damselfly_origin.stats()["bytes"] == 24 * MiB


async def test_a_transport_that_cannot_connect_falls_back_to_the_next(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    """The seed's QUIC demands a client certificate peer1 lacks: peer1 falls back to tcp."""
    from damselfly.plugins.transport.quic import self_signed

    ca_pem, _ = self_signed(tmp_path / "ca", ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    strict = {**QUIC, "require_client_cert": True, "ca": str(tmp_path / "ca.pem")}
    src = damselfly_origin.make("g.bin", 8 * MiB)
    cluster = damselfly_cluster_factory(
        peers=1, peer_env={0: transports(strict, {"type": "tcp"}), 1: transports(QUIC, {"type": "tcp"})}, env=SEED_READS
    )
    await download(cluster, "peer1", damselfly_origin.url("g.bin"), tmp_path / "o1")
    assert sha(tmp_path / "o1") == sha(src)
    metric = "dragonfly_dfdaemon_download_transport_bytes_total"
    assert cluster.metric("peer1", metric, '{transport="tcp"}') == 8 * MiB
    assert cluster.metric("peer1", metric, '{transport="quic"}') == 0
    log = cluster.log("peer1")
    assert "transport quic to" in log and "trying the next one" in log


def test_an_unknown_transport_is_a_one_line_error(tmp_path):
    env = {**os.environ, **transports({"type": "carrier-pigeon"}), "DAMSELFLY_DAEMON__DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "damselfly", "daemon", "--ready-file", str(tmp_path / "r.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "carrier-pigeon" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("transport", ["quic", "webrtc"])
def test_demo_over_one_transport(transport):
    args = ["demo", "--transport", transport, "--peers", "3", "--size", "8MiB", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "damselfly", *args],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["transport"] == transport and r["all_digests_ok"]
    assert r["origin_bytes"] == r["file_size"]
    assert r["p2p_bytes"] + r["peer_source_bytes"] == 3 * r["file_size"]
    # the peers' bytes, and the seed's from the peers (the blocks they read of the source)
    assert set(r["transport_bytes"]) == {transport} and r["transport_bytes"][transport] >= r["p2p_bytes"]


async def test_rdma_without_a_device_gives_way_to_the_next_transport(
    damselfly_origin, damselfly_cluster_factory, tmp_path
):
    src = damselfly_origin.make("r.bin", 8 * MiB)
    both = transports({"type": "rdma"}, {"type": "tcp"})
    cluster = damselfly_cluster_factory(peers=1, peer_env={0: both, 1: both}, env=SEED_READS)
    await download(cluster, "peer1", damselfly_origin.url("r.bin"), tmp_path / "o1")
    assert sha(tmp_path / "o1") == sha(src)
    log = cluster.log("peer1")
    assert "transport rdma is skipped, using the next one" in log
    assert "cannot run here" in log
    assert cluster.metric("peer1", "dragonfly_dfdaemon_download_transport_bytes_total", '{transport="tcp"}') == 8 * MiB
