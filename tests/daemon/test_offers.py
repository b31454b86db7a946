"""A super-seeding seed's offers: one SuperSeeder per task, and only the told child's stream wakes."""

import asyncio

from damselfly.core.task import PieceRecord, Task
from damselfly.daemon.offers import Offers


def _task(pieces: int, held: int) -> Task:
    task = Task(id="a" * 64, url="http://origin.example/f.bin", content_length=1024 * pieces, piece_length=1024)
    for n in range(held):
        task.pieces[n] = PieceRecord(n, n * 1024, 1024, "crc32:0")
    return task


def _seeding() -> Offers:
    return Offers(True, offer_timeout=5.0, per_child=1)


def test_offers_are_off_unless_the_seed_super_seeds():
    offers = Offers(False, offer_timeout=5.0, per_child=1)
    task = _task(2, 1)
    event = asyncio.Event()
    offers.listen(task.id, "child", event)
    offers.offer(task)
    assert offers.seeder(task) is None and offers.seeders == {}
    assert not event.is_set()


def test_a_task_keeps_one_seeder_sized_to_its_pieces():
    offers = _seeding()
    task = _task(3, 0)
    seeder = offers.seeder(task)
    assert seeder is not None and seeder is offers.seeder(task)
    assert (seeder.piece_count, seeder.per_child, seeder.offer_timeout) == (3, 1, 5.0)


def test_an_offer_wakes_the_stream_of_the_child_told_and_no_other():
    offers = _seeding()
    task = _task(2, 1)  # the seed holds piece 0: one offer to make
    seeder = offers.seeder(task)
    assert seeder is not None
    events = {child: asyncio.Event() for child in ("a", "b")}
    for child, event in events.items():
        seeder.join(child, {0, 1})
        offers.listen(task.id, child, event)
    offers.offer(task)
    woken = [child for child, event in events.items() if event.is_set()]
    assert woken == ["a"]  # the first to join, among equals
    assert seeder.visible("a", task.pieces.keys()) == {0} and seeder.visible("b", task.pieces.keys()) == set()


def test_a_stream_that_stopped_listening_is_not_woken():
    offers = _seeding()
    task = _task(1, 1)
    seeder = offers.seeder(task)
    assert seeder is not None
    event = asyncio.Event()
    seeder.join("a", {0})
    offers.listen(task.id, "a", event)
    offers.unlisten(task.id, "a")
    offers.offer(task)
    assert not event.is_set()
    assert seeder.visible("a", task.pieces.keys()) == {0}  # offered all the same: the seeder decides


def test_forgetting_a_task_wakes_its_streams_and_drops_its_state():
    offers = _seeding()
    task = _task(2, 0)
    first = offers.seeder(task)
    event = asyncio.Event()
    offers.listen(task.id, "a", event)
    offers.forget(task.id)
    assert event.is_set()  # the stream wakes, finds the task gone and ends
    assert task.id not in offers.events
    assert offers.seeder(task) is not first  # a new start
