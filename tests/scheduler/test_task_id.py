"""The scheduler's task id of a Download is the one the daemon computes from the same request:
it refuses a register under any other, so the two must never disagree."""

import pytest
from dragonfly_api import common_pb2

from damselfly.core import ids
from damselfly.core.errors import InvalidArgument
from damselfly.daemon.request import DownloadRequest
from damselfly.rpc.wire import download_task_id

BLOB = "https://registry.example/v2/team/app/blobs/sha256:" + "ab" * 32
CACHE = "damselfly-cache://" + "cd" * 32
BOUND = ids.bound_blob_content("https", "registry.example", ids.parse_blob_url(BLOB))

DOWNLOADS = [
    common_pb2.Download(url="http://origin.example/a.bin"),
    common_pb2.Download(url="HTTP://Origin.Example/a.bin?b=2&a=1&X-Amz-Signature=s", tag="t", application="app"),
    common_pb2.Download(url="http://origin.example/a.bin?a=1&b=2", filtered_query_params=["b"]),
    common_pb2.Download(url="http://origin.example/a.bin", piece_length=4 << 20),
    common_pb2.Download(url="hf://acme/llm/model.bin", hugging_face=common_pb2.HuggingFace(revision="v2")),
    common_pb2.Download(url="hf://acme/llm/model.bin", hugging_face=common_pb2.HuggingFace(token="t")),
    common_pb2.Download(url=BLOB, enable_task_id_based_blob_digest=True),
    common_pb2.Download(url=BLOB, enable_task_id_based_blob_digest=False),
    common_pb2.Download(url="http://origin.example/x/blobs/sha256:" + "ab" * 32, enable_task_id_based_blob_digest=True),
    common_pb2.Download(url=BLOB, content_for_calculating_task_id=BOUND),
    common_pb2.Download(url=CACHE, content_for_calculating_task_id=CACHE, tag="ignored with a content key"),
    common_pb2.Download(url="s3://bucket/key", object_storage=common_pb2.ObjectStorage(region="eu")),
    common_pb2.Download(url="s3://bucket/key", object_storage=common_pb2.ObjectStorage(endpoint="http://evil.example")),
    common_pb2.Download(url="s3://bucket/key", object_storage=common_pb2.ObjectStorage(insecure_skip_verify=True)),
    common_pb2.Download(url="hf://acme/llm/model.bin", hugging_face=common_pb2.HuggingFace(base_url="http://hub.evil")),
]  # fmt: skip


@pytest.mark.parametrize("download", DOWNLOADS, ids=range(len(DOWNLOADS)))
def test_the_schedulers_task_id_of_a_download_is_the_daemons(download):
    assert download_task_id(download) == DownloadRequest.from_proto(download).task_id()
    # what a daemon sends for a request names the same task again
    assert download_task_id(DownloadRequest.from_proto(download).to_proto()) == download_task_id(download)


def test_each_field_of_the_id_changes_it():
    base = common_pb2.Download(url="http://origin.example/a.bin?a=1")
    seen = {download_task_id(base)}
    for change in (
        {"url": "http://origin.example/b.bin?a=1"},
        {"tag": "t"},
        {"application": "app"},
        {"piece_length": 1 << 20},
        {"filtered_query_params": ["a"]},
        {"content_for_calculating_task_id": "k"},
    ):
        d = common_pb2.Download()
        d.CopyFrom(base)
        for k, v in change.items():
            if isinstance(v, list):
                getattr(d, k).extend(v)
            else:
                setattr(d, k, v)
        seen.add(download_task_id(d))
    d = common_pb2.Download(url=base.url, hugging_face=common_pb2.HuggingFace(revision="r"))
    seen.add(download_task_id(d))
    assert len(seen) == 8


def test_a_download_without_scheme_or_host_has_no_task_id():
    for url in ("", "no scheme", "http://"):
        with pytest.raises(InvalidArgument, match="invalid url"):
            download_task_id(common_pb2.Download(url=url))
