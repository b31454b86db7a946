"""Super-seeding and upload slots: what a seed sends, declines, and tells a busy child."""

import asyncio

import pytest

from damselfly.core import vortex
from damselfly.core.errors import Busy, Declined, NotFound
from damselfly.daemon.superseed import SuperSeeder
from damselfly.plugins.transport.common import PieceResponse, error_frame


def test_a_piece_goes_out_once_while_the_seed_holds_one_never_sent():
    s = SuperSeeder()
    held = {0: None, 1: None}
    assert s.admit(0, held)  # first request for piece 0: sent
    assert not s.admit(0, held)  # again, while piece 1 never went out: declined
    assert s.admit(1, held)
    assert s.admit(0, held)  # every held piece went out once: the seed serves whatever is asked
    held[2] = None  # a new piece lands: duplicates wait again
    assert not s.admit(1, held)
    assert s.admit(2, held)


@pytest.mark.parametrize(
    ("exc", "code", "raised"),
    [
        (Busy("all 2 upload slots are taken"), vortex.ErrorCode.UNAVAILABLE, Busy),
        (Declined("piece 3 went out already"), vortex.ErrorCode.DECLINED, Declined),
        (NotFound("no piece 3"), vortex.ErrorCode.NOT_FOUND, NotFound),
    ],
)
def test_busy_and_declined_cross_the_wire_as_their_own_codes(exc, code, raised):
    frame = error_frame(exc, packet_id=7)
    decoder = vortex.Decoder()
    decoder.receive_data(frame)
    event = decoder.next_event()
    assert isinstance(event, vortex.Error) and event.code == code
    with pytest.raises(raised) as got:
        PieceResponse(3).feed(frame)
    assert type(got.value) is raised  # Busy and Declined are NotFounds (the connection stays), told apart


@pytest.mark.timeout(60)
async def test_upload_slots_answer_busy_and_free_up_when_the_piece_is_sent(tmp_path):
    from damselfly.config import Settings
    from damselfly.core.piece import PieceSpan, digest
    from damselfly.core.task import Task
    from damselfly.daemon.daemon import Daemon
    from damselfly.daemon.upload import lookup_piece

    settings = Settings(daemon={"data_dir": tmp_path, "upload_slots": 1, "seed": True, "super_seed": True})
    d = Daemon(settings)
    await d.storage.open()
    try:
        data = b"x" * 1024
        task = await d.storage.create(Task(id="a" * 64, content_length=2048, piece_length=1024))
        for n in (0, 1):
            w = d.storage.writer(task.id, PieceSpan(n, n * 1024, 1024))
            w.write(data)
            await w.commit(digest(data))
        first = await lookup_piece(d, task.id, 0)
        with pytest.raises(Busy):
            await lookup_piece(d, task.id, 1)  # the one slot is taken
        assert first.release is not None
        first.release()
        first.release()  # twice is harmless
        with pytest.raises(Declined):
            await lookup_piece(d, task.id, 0)  # sent once, and piece 1 never went out
        second = await lookup_piece(d, task.id, 1)
        second.release()
        again = await lookup_piece(d, task.id, 0)  # both went out: served again
        again.release()
        assert d.uploading == 0
    finally:
        await d.storage.close()
        await asyncio.sleep(0)
