"""The piece timeline a daemon keeps per download: bounded, and kept after the download ends."""

import pytest

from damselfly.daemon import runtime
from damselfly.daemon.runtime import TaskBoard, TaskRuntime

pytestmark = pytest.mark.timeout(10)


def test_a_running_downloads_timeline_lists_its_steps_in_order():
    board = TaskBoard()
    rt = TaskRuntime("t1")
    board.add(rt)
    rt.note("requested", 0, "p1")
    rt.note("stored", 0, "p1", length=4, seconds=0.5)
    events = board.timeline("t1")
    assert [(e.kind, e.piece, e.parent_id) for e in events] == [("requested", 0, "p1"), ("stored", 0, "p1")]
    assert events[1].to_dict()["length"] == 4


def test_a_finished_downloads_timeline_outlives_it_and_an_unknown_task_has_none():
    board = TaskBoard()
    rt = TaskRuntime("t1")
    board.add(rt)
    rt.note("back_to_source", detail="no parents")
    board.remove(rt)
    assert [e.kind for e in board.timeline("t1")] == ["back_to_source"]
    assert board.timeline("t2") is None


def test_only_the_latest_finished_timelines_are_kept(monkeypatch):
    monkeypatch.setattr(runtime, "TIMELINE_TASKS", 2)
    board = TaskBoard()
    for task_id in ("a", "b", "c"):
        rt = TaskRuntime(task_id)
        board.add(rt)
        rt.note("stored", 0)
        board.remove(rt)
    assert board.timeline("a") is None
    assert board.timeline("b") is not None and board.timeline("c") is not None


def test_a_long_download_keeps_its_latest_events():
    rt = TaskRuntime("t1")
    for n in range(runtime.TIMELINE_EVENTS + 5):
        rt.note("stored", n)
    assert len(rt.timeline) == runtime.TIMELINE_EVENTS and rt.timeline[0].piece == 5
