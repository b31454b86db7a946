"""A download request: the digest its url names, and its one conversion from and to the protobuf Download."""

from dragonfly_api import common_pb2

from damselfly.core import ids
from damselfly.core.task import Task
from damselfly.daemon.request import DownloadRequest, named_digest


def test_a_url_names_its_contents_digest_when_it_is_a_blob_or_a_cache_task():
    blob = "https://registry.example/v2/team/app/blobs/sha256:" + "cd" * 32
    assert named_digest(blob) == "sha256:" + "cd" * 32
    assert named_digest(ids.cache_url("ab" * 32)) == "sha256:" + "ab" * 32
    assert named_digest("damselfly-cache://not-a-digest") is None
    assert named_digest("https://example.com/file.tar") is None


def test_a_request_survives_the_trip_through_the_protobuf_download():
    req = DownloadRequest(
        url="s3://bucket/key",
        tag="t",
        application="a",
        priority=3,
        filtered_query_params=["X-Amz-Date"],
        request_header={"k": "v"},
        piece_length=4 << 20,
        digest="sha256:" + "00" * 32,
        output_path="/tmp/out",
        need_back_to_source=True,
        content_for_calculating_task_id="key",
        range=(10, 20),
        use_blob_digest=False,
        source_options={"object_storage": {"region": "eu"}},
    )
    assert DownloadRequest.from_proto(req.to_proto()) == req
    assert DownloadRequest.from_proto(req.to_proto()).task_id() == req.task_id()


def test_the_protobuf_download_carries_the_tasks_actual_layout_once_known():
    task = Task(id="e" * 64, content_length=10 << 20, piece_length=4 << 20)
    pb = DownloadRequest(url="https://example.com/f").to_proto(task)
    assert (pb.actual_content_length, pb.actual_piece_length, pb.actual_piece_count) == (10 << 20, 4 << 20, 3)
    assert pb.type == common_pb2.TaskType.STANDARD
    assert not DownloadRequest(url="https://example.com/f").to_proto().actual_content_length
