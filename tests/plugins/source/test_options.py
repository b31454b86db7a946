"""The sources' request options, described once (plugins/source/options.py): what the
flags, the scheduler's redaction, p2pfs and s3fs get from the description."""

import pytest
from dragonfly_api import common_pb2

from damselfly.plugins.source import options
from damselfly.plugins.source.fsspec_source import S3Source
from damselfly.plugins.source.hdfs import HdfsSource
from damselfly.plugins.source.hf import HfSource
from damselfly.plugins.source.options import REQUEST_CONFIGS, HfConfig, S3Config
from damselfly.rpc import wire


@pytest.mark.parametrize("config", REQUEST_CONFIGS, ids=lambda c: c.message)
def test_every_field_a_source_reads_from_a_request_is_a_field_of_dragonflys_message(config):
    message = getattr(common_pb2.Download(), config.message)
    assert options.wire_fields(config) <= {f.name for f in message.DESCRIPTOR.fields}


@pytest.mark.parametrize("config", REQUEST_CONFIGS, ids=lambda c: c.message)
def test_the_scheduler_strips_exactly_the_credentials_the_sources_describe(config):
    assert options.wire_fields(config, credential=True) == set(wire.SOURCE_SECRETS[config.message])


@pytest.mark.parametrize("config", REQUEST_CONFIGS, ids=lambda c: c.message)
def test_the_task_id_counts_exactly_the_endpoints_the_sources_describe(config):
    assert options.wire_fields(config, endpoint=True) == set(wire.ENDPOINT_FIELDS.get(config.message, ()))


def test_the_sources_take_their_request_field_credentials_and_endpoints_from_their_options():
    assert (S3Source.request_field, HdfsSource.request_field, HfSource.request_field) == (
        "object_storage",
        "hdfs",
        "hugging_face",
    )
    assert S3Source.credential_fields == {"access_key_id", "access_key_secret", "session_token"}
    assert S3Source.endpoint_fields == {"endpoint", "insecure_skip_verify"}
    assert HdfsSource.credential_fields == {"delegation_token", "user"}
    assert HdfsSource.endpoint_fields == {"port", "use_https"}
    assert HfSource.credential_fields == {"token"}
    assert HfSource.endpoint_fields == {"base_url"}


def test_the_flags_are_dfgets_in_dfgets_order():
    assert [(f.option, f.message, f.field) for f in options.flags()] == [
        ("--storage-region", "object_storage", "region"),
        ("--storage-endpoint", "object_storage", "endpoint"),
        ("--storage-access-key-id", "object_storage", "access_key_id"),
        ("--storage-access-key-secret", "object_storage", "access_key_secret"),
        ("--storage-session-token", "object_storage", "session_token"),
        ("--storage-credential-path", "object_storage", "credential_path"),
        ("--storage-predefined-acl", "object_storage", "predefined_acl"),
        ("--hdfs-delegation-token", "hdfs", "delegation_token"),
        ("--hf-token", "hugging_face", "token"),
        ("--hf-revision", "hugging_face", "revision"),
    ]


def test_flags_fill_only_the_messages_and_fields_they_set():
    values = {"storage_region": "eu", "storage_endpoint": "", "hf_token": "t", "output": "ignored"}
    assert options.from_flags(values) == {"object_storage": {"region": "eu"}, "hugging_face": {"token": "t"}}
    assert options.from_flags({}) == {}


def test_s3fs_options_become_the_object_storage_message():
    s3 = {
        "key": "AK",
        "secret": "SK",
        "token": "ST",
        "endpoint_url": "http://minio:9000",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False},
    }
    assert options.from_fsspec("s3a", s3) == {
        "object_storage": {
            "region": "eu-west-1",
            "endpoint": "http://minio:9000",
            "access_key_id": "AK",
            "access_key_secret": "SK",
            "session_token": "ST",
            "insecure_skip_verify": True,
        }
    }
    assert options.from_fsspec("s3", {"client_kwargs": {"endpoint_url": "http://e"}}) == {
        "object_storage": {"endpoint": "http://e"}
    }


def test_hf_and_webhdfs_options_become_their_messages_and_others_nothing():
    assert options.from_fsspec("hf", {"token": "t", "revision": "v1", "endpoint": "http://hub"}) == {
        "hugging_face": {"token": "t", "revision": "v1", "base_url": "http://hub"}
    }
    assert options.from_fsspec("webhdfs", {"token": "dt", "user": "u"}) == {"hdfs": {"delegation_token": "dt"}}
    assert options.from_fsspec("webhdfs", {"user": "u"}) == {}
    assert options.from_fsspec("s3", {"client_kwargs": {"verify": True}}) == {}
    assert options.from_fsspec("gs", {"token": "t"}) == {}


def test_s3_sends_its_keys_only_with_their_id_and_then_the_secret_always():
    assert S3Source(S3Config(access_key_secret="SK", session_token="ST")).storage_options("s3") == {}
    assert S3Source(S3Config(access_key_id="AK")).storage_options("s3") == {"key": "AK", "secret": ""}
    full = S3Config(access_key_id="AK", access_key_secret="SK", session_token="ST")
    assert S3Source(full).storage_options("s3") == {"key": "AK", "secret": "SK", "token": "ST"}


def test_s3_puts_region_endpoint_and_verification_in_the_client_kwargs():
    o = S3Config(region="eu", endpoint="http://minio:9000", insecure_skip_verify=True, anonymous=True)
    assert S3Source(o).storage_options("s3") == {
        "client_kwargs": {"region_name": "eu", "endpoint_url": "http://minio:9000", "verify": False},
        "anon": True,
    }


def test_s3_options_read_back_from_what_s3_gives_s3fs():
    o = S3Config(region="eu", endpoint="http://e", access_key_id="AK", access_key_secret="SK")
    o = o.model_copy(update={"insecure_skip_verify": True})
    again = options.from_fsspec("s3", S3Source(o).storage_options("s3"))["object_storage"]
    assert S3Config(**again) == o


def test_a_request_config_lists_its_described_fields_then_the_carried_ones():
    assert [name for name, _ in options.described(HfConfig)] == ["token", "revision", "base_url"]
    assert [name for name, _ in options.described(S3Config)][-3:] == [
        "credential_path",
        "predefined_acl",
        "security_token",
    ]
