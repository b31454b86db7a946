"""A plugin that records every behaviour hook call as a JSON line in $DAMSELFLY_TEST_HOOK_LOG."""

from __future__ import annotations

import json
import os

from damselfly import hookimpl


def _log(hook: str, **kw: object) -> None:
    with open(os.environ["DAMSELFLY_TEST_HOOK_LOG"], "a") as f:
        f.write(json.dumps({"hook": hook, **kw}) + "\n")


@hookimpl
def damselfly_piece_verified(task_id, number, length, parent_id, traffic_type):  # type: ignore[no-untyped-def]
    _log(
        "damselfly_piece_verified",
        task_id=task_id,
        number=number,
        length=length,
        parent_id=parent_id,
        traffic_type=traffic_type,
    )


@hookimpl
def damselfly_piece_failed(task_id, number, parent_id, reason):  # type: ignore[no-untyped-def]
    _log("damselfly_piece_failed", task_id=task_id, number=number, parent_id=parent_id, reason=reason)


@hookimpl
def damselfly_task_finished(task_id, url, content_length, peer_bytes, source_bytes):  # type: ignore[no-untyped-def]
    _log(
        "damselfly_task_finished",
        task_id=task_id,
        url=url,
        content_length=content_length,
        peer_bytes=peer_bytes,
        source_bytes=source_bytes,
    )
