"""Container images through the swarm, with a real registry (docker-registry), containerd and skopeo."""

import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from damselfly.testing import registry as reg
from tests.helpers.waiting import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(bool(reg.missing_tools()), reason=f"needs {reg.missing_tools()} (.ci/run installs them)"),
]

MiB = 1 << 20


@pytest.fixture
def registry(tmp_path):
    yield from reg.registry_fixture(tmp_path / "registry")


@pytest.fixture
def containerd(tmp_path):
    c = reg.Containerd(tmp_path / "containerd").start()
    yield c
    c.stop()


def test_three_runtimes_pull_each_blob_from_the_registry_once(
    registry, containerd, damselfly_cluster_factory, tmp_path
):
    image = reg.build_and_push(tmp_path / "image", registry, "test/app", [3 * MiB, 6 * MiB, 1 * MiB, 9 * MiB])
    assert len(image.blobs) == 5  # four layers and the config
    cluster = damselfly_cluster_factory(peers=3, env={"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{registry.address}"})
    before = registry.blob_bytes()
    pulled = containerd.pull(image.reference, cluster.daemon("peer1")["proxy"])
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert containerd.image_digest(image.reference) == image.manifest_digest
    work = tmp_path / "skopeo"
    work.mkdir()
    for peer in ("peer2", "peer3"):
        digest = reg.skopeo_pull(work, image.reference, cluster.daemon(peer)["proxy"], peer)
        assert digest == image.manifest_digest
    sent = registry.blob_bytes()
    for digest, size in image.blobs.items():
        assert sent.get(digest, 0) - before.get(digest, 0) == size, f"{digest}: the registry sent it more than once"


def test_a_range_of_a_blob_fetches_only_its_pieces(registry, damselfly_cluster_factory, tmp_path):
    image = reg.build_and_push(tmp_path / "image", registry, "test/big", [13 * MiB])
    layer = max(image.blobs, key=image.blobs.get)
    cluster = damselfly_cluster_factory(peers=1, env={"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{registry.address}"})
    url = f"http://{cluster.daemon('peer1')['proxy']}/v2/test/big/blobs/{layer}"
    req = urllib.request.Request(url, headers={"Range": f"bytes={5 * MiB}-{5 * MiB + 99}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got = r.read()
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes {5 * MiB}-{5 * MiB + 99}/{image.blobs[layer]}"
    layout_blob = tmp_path / "image" / "layout" / "blobs" / "sha256" / layer.split(":")[1]
    assert got == layout_blob.read_bytes()[5 * MiB : 5 * MiB + 100]
    assert registry.blob_bytes().get(layer, 0) == 4 * MiB  # the one 4 MiB piece holding those bytes


def test_a_nydusd_configured_by_runtime_config_reads_chunks_of_a_blob_lazily(
    registry, damselfly_cluster_factory, tmp_path
):
    """nydusd as its mirror config drives it (no nydusd package exists here): ping, then Range reads."""
    import json

    from damselfly.oci.runtimes import runtime_snippet

    image = reg.build_and_push(tmp_path / "image", registry, "test/lazy", [17 * MiB])
    layer = max(image.blobs, key=image.blobs.get)
    cluster = damselfly_cluster_factory(peers=1)  # no default mirror: the config's header names the registry
    snippet = runtime_snippet("nydus", cluster.daemon("peer1")["proxy"], f"http://{registry.address}")
    mirror = json.loads(snippet.split("\n", 1)[1])["device"]["backend"]["config"]["mirrors"][0]
    with urllib.request.urlopen(mirror["ping_url"], timeout=30) as r:
        assert r.status == 200
    blob = (tmp_path / "image" / "layout" / "blobs" / "sha256" / layer.split(":")[1]).read_bytes()
    before = registry.blob_bytes().get(layer, 0)
    for start, length in ((1 * MiB, 64 * 1024), (13 * MiB + 7, 1 * MiB), (1 * MiB + 4096, 4096)):
        req = urllib.request.Request(
            f"{mirror['host']}/v2/test/lazy/blobs/{layer}",
            headers={**mirror["headers"], "Range": f"bytes={start}-{start + length - 1}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 206
            assert r.read() == blob[start : start + length]
    # pieces 0 and 3 (of five 4 MiB pieces) hold those bytes: the registry sent those two only
    assert registry.blob_bytes().get(layer, 0) - before == 8 * MiB


@pytest.fixture
def private_registry(tmp_path):
    yield from reg.registry_fixture(tmp_path / "private", users={"alice": "s3cret"})


def test_a_private_image_stays_private(private_registry, damselfly_cluster_factory, tmp_path):
    image = reg.build_and_push(tmp_path / "image", private_registry, "team/secret", [2 * MiB], creds="alice:s3cret")
    mirror = {"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{private_registry.address}"}
    cluster = damselfly_cluster_factory(peers=1, env=mirror)
    proxy = cluster.daemon("peer1")["proxy"]
    work = tmp_path / "pulls"
    work.mkdir()
    assert reg.skopeo_pull(work, image.reference, proxy, "alice", creds="alice:s3cret") == image.manifest_digest
    layer = max(image.blobs, key=image.blobs.get)
    # the layer is on the peer's disk now; without credentials it is still refused
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{proxy}/v2/team/secret/blobs/{layer}", timeout=30)
    assert refused.value.code == 401
    refused.value.close()
    with pytest.raises(RuntimeError, match=r"unauthorized|authentication required|401"):
        reg.skopeo_pull(work, image.reference, proxy, "mallory", creds="mallory:guess")
    assert private_registry.blob_bytes().get(layer, 0) == image.blobs[layer]  # alice's pull only


def test_with_the_daemon_down_containerd_falls_back_to_the_registry(
    registry, containerd, damselfly_cluster_factory, tmp_path
):
    image = reg.build_and_push(tmp_path / "image", registry, "test/fallback", [2 * MiB])
    cluster = damselfly_cluster_factory(peers=1, env={"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{registry.address}"})
    proxy = cluster.daemon("peer1")["proxy"]
    cluster.stop_daemon("peer1")
    pulled = containerd.pull(image.reference, proxy)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert containerd.image_digest(image.reference) == image.manifest_digest


def test_a_daemon_killed_mid_pull_leaves_containerd_to_finish_from_the_registry(
    registry, containerd, damselfly_cluster_factory, tmp_path
):
    image = reg.build_and_push(tmp_path / "image", registry, "test/midpull", [24 * MiB])
    layer = max(image.blobs, key=image.blobs.get)
    size = image.blobs[layer]
    # The registry is reached through a 4 MiB/s forwarder, and the seed reads one piece at a time,
    # so the blob reaches containerd piece by piece, slowly enough to kill the daemon between two.
    with reg.Limiter(("127.0.0.1", registry.port), 4 * MiB) as slow:
        reference = image.reference.replace(registry.address, slow.address)
        cluster = damselfly_cluster_factory(
            peers=1,
            env={"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{slow.address}"},
            peer_env={0: {"DAMSELFLY_DAEMON__SOURCE_CONCURRENT_PIECES": "1"}},
        )
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        pull = threading.Thread(
            target=lambda: result.update(p=containerd.pull(reference, cluster.daemon("peer1")["proxy"]))
        )
        pull.start()
        try:

            def part_of_the_layer() -> int:
                got = next((n for ref, n in containerd.active().items() if layer in ref), 0)
                return got if 0 < got < size // 2 else 0

            received = wait_until(part_of_the_layer, timeout=60, what="containerd to receive part of the layer")
            cluster.stop_daemon("peer1", kill=True)
        finally:
            pull.join(150)
    pulled = result["p"]
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert containerd.image_digest(reference) == image.manifest_digest
    # containerd went on from where the daemon stopped: one ranged GET of the rest, from the registry
    rest = [n for method, uri, status, n in registry.requests() if layer in uri and method == "GET" and status == 206]
    assert any(4 * MiB < n <= size - received for n in rest), (received, rest)


def test_preheat_then_a_pull_reads_no_blob_from_the_registry(registry, damselfly_cluster_factory, tmp_path):
    import json
    import subprocess
    import sys

    image = reg.build_and_push(tmp_path / "image", registry, "test/pre", [2 * MiB, 5 * MiB])
    cluster = damselfly_cluster_factory(peers=2, env={"DAMSELFLY_PROXY__REGISTRY_MIRROR": f"http://{registry.address}"})
    cmd = [sys.executable, "-m", "damselfly", "preheat", f"oci://{image.reference}"]
    cmd += ["--scheduler", cluster.info["scheduler"], "--scope", "all_seed_peers", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["layers"]) == 3 and all(layer["finished"] for layer in report["layers"])
    assert list(report["hosts"].values()) == [3]  # the seed holds all three blobs
    preheated = registry.blob_bytes()
    assert {d: preheated.get(d, 0) for d in image.blobs} == image.blobs  # read once, by the seed
    work = tmp_path / "pull"
    work.mkdir()
    assert reg.skopeo_pull(work, image.reference, cluster.daemon("peer2")["proxy"], "after") == image.manifest_digest
    assert registry.blob_bytes() == preheated  # the pull read no blob from the registry
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "damselfly",
            "preheat",
            f"oci://{registry.address}/test/none:v1",
            "--scheduler",
            cluster.info["scheduler"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "404" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_oci_source(private_registry, damselfly_cluster_factory, tmp_path):
    """`damselfly get oci://...`: a tag (its manifest), a blob by digest, -r of a whole image; Basic auth."""
    import hashlib
    import json
    import subprocess
    import sys

    image = reg.build_and_push(tmp_path / "image", private_registry, "team/tool", [3 * MiB], creds="alice:s3cret")
    creds = {"DAMSELFLY_SOURCES__OCI__USERNAME": "alice", "DAMSELFLY_SOURCES__OCI__PASSWORD": "s3cret"}
    cluster = damselfly_cluster_factory(peers=1, env=creds)

    def get(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "damselfly", "get", *args, "--socket", cluster.daemon("peer1")["socket"]]
        return subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, timeout=120, check=False)

    proc = get(f"oci://{image.reference}", "-O", str(tmp_path / "manifest.json"))
    assert proc.returncode == 0, proc.stderr
    manifest = (tmp_path / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.manifest_digest
    assert {layer["digest"] for layer in json.loads(manifest)["layers"]} <= set(image.blobs)
    layer = max(image.blobs, key=image.blobs.get)
    proc = get(f"oci://{private_registry.address}/team/tool@{layer}", "-O", str(tmp_path / "layer"))
    assert proc.returncode == 0, proc.stderr
    assert "sha256:" + hashlib.sha256((tmp_path / "layer").read_bytes()).hexdigest() == layer
    proc = get("-r", f"oci://{image.reference}", "-O", str(tmp_path / "all"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(image.blobs)
