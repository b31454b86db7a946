"""The moto_server request log is read whether or not werkzeug coloured its lines."""

from damselfly.testing.s3 import S3Server


def test_requests_are_parsed_with_and_without_colour(tmp_path):
    log = tmp_path / "moto.log"
    log.write_text(
        '127.0.0.1 - - [28/Nov/2026 00:21:20] "PUT /t-1/blob.bin HTTP/1.1" 200 -\n'
        '127.0.0.1 - - [28/Nov/2026 00:21:23] "\x1b[35m\x1b[1mGET /t-1/blob.bin HTTP/1.1\x1b[0m" 206 -\n'
        '127.0.0.1 - - [28/Nov/2026 00:21:23] "GET /t-1?list-type=2&prefix=a/ HTTP/1.1" 200 -\n'
        '127.0.0.1 - - [28/Nov/2026 00:21:23] "GET /t-10/other HTTP/1.1" 200 -\n'
    )
    server = S3Server("http://127.0.0.1:1", log)
    assert server.requests("t-1") == [
        ("PUT", "/t-1/blob.bin", 200),
        ("GET", "/t-1/blob.bin", 206),
        ("GET", "/t-1?list-type=2&prefix=a/", 200),
    ]
