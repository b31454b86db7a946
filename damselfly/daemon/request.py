"""What a client asks the daemon to download, and its one conversion from and to the protobuf ``Download``.

``DownloadRequest`` carries the fields of Dragonfly's ``Download`` that the daemon acts on;
local, proxy, upload (preheat), cache and the download itself all speak it. The request-level
constants (the source option messages, the cache pin header, the content digests accepted)
live beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dragonfly_api import common_pb2
from google.protobuf import json_format

from damselfly.core import ids
from damselfly.core.task import Task
from damselfly.rpc.wire import source_endpoint, task_id_of

SOURCE_OPTION_FIELDS = ("object_storage", "hdfs", "hugging_face")
CACHE_EXPIRES_HEADER = "X-Damselfly-Cache-Expires"
CONTENT_DIGESTS = ("sha256", "sha512", "sha1", "md5", "crc32")


def named_digest(url: str) -> str | None:
    """The digest a url names its content by (an OCI blob's ``sha256:``, a persistent cache
    task's sha256), which its task id is bound to; None for other urls."""
    if url.startswith(ids.CACHE_URL_PREFIX):
        return ids.cache_url_digest(url)
    return ids.blob_digest(url)


def source_options_from_proto(message: Any) -> dict[str, dict[str, Any]]:
    """The ``object_storage`` / ``hdfs`` / ``hugging_face`` messages a request carries (a ``Download``,
    a ``StatLocalTaskRequest``...), as dicts: the source options."""
    return {
        name: json_format.MessageToDict(getattr(message, name), preserving_proto_field_name=True)
        for name in SOURCE_OPTION_FIELDS
        if message.HasField(name)
    }


@dataclass
class DownloadRequest:
    """What a client asked for: the fields of Dragonfly's ``Download`` that we act on."""

    url: str
    tag: str = ""
    application: str = ""
    priority: int = 0
    filtered_query_params: list[str] = field(default_factory=list)
    request_header: dict[str, str] = field(default_factory=dict)
    piece_length: int = 0
    digest: str = ""
    output_path: str = ""
    need_back_to_source: bool = False
    disable_back_to_source: bool = False
    content_for_calculating_task_id: str = ""
    range: tuple[int, int] | None = None  # (start, length): only the pieces that overlap it
    use_blob_digest: bool = False
    # the Download's object_storage / hdfs / hugging_face messages, as dicts: source options
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, d: common_pb2.Download) -> DownloadRequest:
        return cls(
            url=d.url,
            tag=d.tag,
            application=d.application,
            priority=d.priority,
            filtered_query_params=list(d.filtered_query_params),
            request_header=dict(d.request_header),
            piece_length=d.piece_length,
            digest=d.digest,
            output_path=d.output_path,
            need_back_to_source=d.need_back_to_source,
            disable_back_to_source=d.disable_back_to_source,
            content_for_calculating_task_id=d.content_for_calculating_task_id,
            use_blob_digest=d.enable_task_id_based_blob_digest,
            range=(d.range.start, d.range.length) if d.HasField("range") and d.range.length > 0 else None,
            source_options=source_options_from_proto(d),
        )

    def to_proto(self, task: Task | None = None) -> common_pb2.Download:
        d = common_pb2.Download(
            url=self.url,
            digest=self.digest,
            type=common_pb2.TaskType.STANDARD,
            tag=self.tag,
            application=self.application,
            priority=self.priority,
            filtered_query_params=self.filtered_query_params,
            request_header=self.request_header,
            piece_length=self.piece_length,
            output_path=self.output_path,
            need_back_to_source=self.need_back_to_source,
            disable_back_to_source=self.disable_back_to_source,
            content_for_calculating_task_id=self.content_for_calculating_task_id,
            enable_task_id_based_blob_digest=self.use_blob_digest,
        )
        if self.range is not None:
            d.range.CopyFrom(common_pb2.Range(start=self.range[0], length=self.range[1]))
        for name, values in self.source_options.items():
            json_format.ParseDict(values, getattr(d, name), ignore_unknown_fields=True)
        if task is not None and task.known_length:
            d.actual_content_length = task.content_length
            d.actual_piece_length = task.piece_length
            d.actual_piece_count = task.piece_count
        return d

    def task_id(self) -> str:
        return task_id_of(
            self.url,
            tag=self.tag,
            application=self.application,
            revision=self.source_options.get("hugging_face", {}).get("revision", ""),
            piece_length=self.piece_length,
            filtered_query_params=self.filtered_query_params,
            content=self.content_for_calculating_task_id,
            blob_digest_mode=self.use_blob_digest,
            endpoint=source_endpoint(self.source_options),  # another server's answer is another task
        )
