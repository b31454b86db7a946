"""Task, host and peer ids against the upstream Dragonfly client's vectors."""

import pytest

from damselfly.core import ids
from damselfly.core.errors import InvalidArgument

TASK_ID_VECTORS = [
    # url, piece_length, tag, application, filtered, revision, expected
    (
        "https://example.com",
        1024,
        "foo",
        "bar",
        [],
        "v1.0",
        "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f",
    ),
    (
        "https://example.com",
        None,
        "foo",
        "bar",
        [],
        None,
        "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca",
    ),
    (
        "https://example.com",
        None,
        "foo",
        None,
        [],
        None,
        "3c3f230ef9f191dd2821510346a7bc138e4894bee9aee184ba250a3040701d2a",
    ),
    (
        "https://example.com",
        None,
        None,
        "bar",
        [],
        None,
        "c9f9261b7305c24371244f9f149f5d4589ed601348fdf22d7f6f4b10658fdba2",
    ),
    (
        "https://example.com",
        1024,
        None,
        None,
        [],
        None,
        "9f7c9aafbc6f30f8f41a96ca77eeae80c5b60964b3034b0ee43ccf7b2f9e52b8",
    ),
    (
        "https://example.com?foo=foo&bar=bar",
        None,
        None,
        None,
        ["foo", "bar"],
        None,
        "457b4328cde278e422c9e243f7bfd1e97f511fec43a80f535cf6b0ef6b086776",
    ),
    (
        "https://example.com/file.txt?z=9&b=2&a=1",
        None,
        "foo",
        "bar",
        ["z"],
        None,
        "8b3f6e9b9b8fe20903bced565cfd1d0aaef354a4c17573f0c2c1979210443f9d",
    ),
    (
        "https://example.com/file.txt?b=2&a=1&b=1",
        None,
        None,
        None,
        ["c"],
        None,
        "7c8801d0596be5e8f9449d5c4af23866c72fe5205119c0e5912981f3b16a37aa",
    ),
    (
        "https://example.com/file.txt?k=a b&m=x*y&n=c~d",
        1024,
        None,
        None,
        ["none"],
        None,
        "6196a6846023f6d3c1e4d30f6c86f3d4186e4c664a33e5692b0e04e49b26a9af",
    ),
    (
        "https://example.com/file.txt?a=1&b=2",
        None,
        "foo",
        None,
        ["a", "b"],
        None,
        "c8f4b41117329d54af920010394f6f607bac707e933ab2f18d372e3dd4c7fcb3",
    ),
    (
        "https://example.com/file.txt?b=2&a=1",
        None,
        None,
        None,
        [],
        None,
        "980ee327518ccc5a7c30703e1a2232e8ba9047b39431f940636c85b6146f8b9a",
    ),
    (
        "https://example.com",
        None,
        None,
        None,
        [],
        "v1.0",
        "b171331534b80e0bf91da38ebbfcdbf4d177898f4b9beac44f14733e3f004d4e",
    ),
]


@pytest.mark.parametrize(
    ("url", "piece_length", "tag", "application", "filtered", "revision", "expected"), TASK_ID_VECTORS
)
def test_task_id_matches_upstream(url, piece_length, tag, application, filtered, revision, expected):
    got = ids.task_id(
        url,
        tag=tag,
        application=application,
        revision=revision,
        piece_length=piece_length,
        filtered_query_params=filtered,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("url", "filtered", "expected"),
    [
        ("https://example.com/file.txt?z=9&b=2&a=1", ["z"], "https://example.com/file.txt?a=1&b=2"),
        ("https://example.com/file.txt?b=2&a=1&b=1", ["c"], "https://example.com/file.txt?a=1&b=2&b=1"),
        ("https://example.com?foo=foo", ["foo"], "https://example.com"),
        (
            "https://example.com/file.txt?k=a b&m=x*y&n=c~d",
            ["none"],
            "https://example.com/file.txt?k=a+b&m=x%2Ay&n=c~d",
        ),
        ("http://www.xx.yy/path?u=f&x=y&m=z&x=s#size", ["x", "m"], "http://www.xx.yy/path?u=f#size"),
        ("http://www.xx.yy/path?u=f&x=y&m=z&x=s#size", [], "http://www.xx.yy/path?u=f&x=y&m=z&x=s#size"),
        ("https://example.com/file.txt?a=1;x&b=2", ["none"], "https://example.com/file.txt?b=2"),
    ],
)
def test_filter_query_params(url, filtered, expected):
    assert ids.filter_query_params(url, filtered) == expected


def test_filter_query_params_rejects_a_malformed_url():
    with pytest.raises(InvalidArgument, match="invalid url"):
        ids.filter_query_params(":error_url", ["x"])


def test_content_task_id():
    assert (
        ids.content_task_id("This is a test file") == "e2d0fe1585a63ec6009c8016ff8dda8b17719a637405a4e23c0ff81339148249"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://registry.example.com/v2/library/ubuntu/blobs/sha256:b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e",
            "b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e",
        ),
        (
            "https://registry.example.com/v2/myorg/myrepo/blobs/sha512:94381a28e8c039fedfa78de025158a068226c3ccd041b22c2c8e73fc993584e9b167d9ae32bc8b372c66701c808ab134e0768c8f16b9a3e61eec1ccf8faa9db8",
            "94381a28e8c039fedfa78de025158a068226c3ccd041b22c2c8e73fc993584e9b167d9ae32bc8b372c66701c808ab134e0768c8f16b9a3e61eec1ccf8faa9db8",
        ),
        (
            "http://localhost:5000/v2/myrepo/blobs/sha256:b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e?ns=docker.io",
            "b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e",
        ),
    ],
)
def test_blob_digest_task_id(url, expected):
    assert ids.blob_task_id(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/file.txt",
        "http://registry.example.com/v2/library/ubuntu/blobs/sha256:abc",
        "http://registry.example.com/v2/library/ubuntu/blobs/md5:8a04994a666b4e4b20a2fd9e5a44f44c",
    ],
)
def test_blob_digest_task_id_rejects_non_blobs(url):
    with pytest.raises(InvalidArgument):
        ids.blob_task_id(url)


def test_host_and_peer_ids():
    assert ids.host_id("127.0.0.1", "localhost") == "127.0.0.1-localhost"
    assert ids.host_id("127.0.0.1", "localhost", seed=True) == "127.0.0.1-localhost-seed"
    p = ids.peer_id("127.0.0.1", "localhost")
    assert p.startswith("127.0.0.1-localhost-") and not p.endswith("-seed")
    assert ids.peer_id("127.0.0.1", "localhost", seed=True).endswith("-seed")
    assert ids.peer_id("127.0.0.1", "localhost") != p


def test_default_filtered_params_drop_s3_signatures():
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Date=1&versionId=3"
    plain = "https://b.s3.amazonaws.com/k?X-Amz-Signature=zzz&X-Amz-Date=2&versionId=3"
    f = ids.DEFAULT_FILTERED_QUERY_PARAMS
    assert ids.task_id(signed, filtered_query_params=f) == ids.task_id(plain, filtered_query_params=f)


def test_manifest_digest_task_id():
    url = "http://r/v2/library/ubuntu/manifests/sha256:" + "c" * 64
    assert ids.manifest_task_id(url) == "c" * 64
    with pytest.raises(InvalidArgument):
        ids.manifest_task_id("http://r/v2/library/ubuntu/manifests/latest")


def test_a_cache_url_names_its_content_by_sha256_and_keys_its_own_task():
    sha = "ab" * 32
    url = ids.cache_url(sha, tag="v1", application="app")
    assert url == f"damselfly-cache://{sha}?tag=v1&application=app"
    assert ids.cache_url(sha) == ids.CACHE_URL_PREFIX + sha
    assert ids.cache_url_digest(url) == f"sha256:{sha}"
    assert ids.cache_task_id(url) == ids.keyed_task_id(url) != ids.keyed_task_id(ids.cache_url(sha))


@pytest.mark.parametrize(
    "url",
    [
        "damselfly-cache://" + "AB" * 32,  # not lowercase hex
        "damselfly-cache://" + "ab" * 31,  # too short
        "https://example.com/" + "ab" * 32,  # not a cache url
    ],
)
def test_only_a_well_formed_cache_url_names_a_digest(url):
    assert ids.cache_url_digest(url) is None
