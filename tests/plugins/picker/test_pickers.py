"""Piece pickers order what a download still needs."""

from damselfly.plugins.picker.pickers import RarestFirstPicker, SequentialPicker


def test_sequential_is_lowest_first():
    assert SequentialPicker().order({5, 1, 3}, {1: 3, 3: 1, 5: 2}) == [1, 3, 5]


def test_rarest_first_orders_by_holders_and_puts_unheld_last():
    order = RarestFirstPicker().order({1, 2, 3, 4, 5}, {1: 3, 2: 1, 3: 2, 4: 1})
    assert set(order[:2]) == {2, 4}  # held by one parent each
    assert order[2:] == [3, 1, 5]  # then two, three, and nobody yet


def test_rarest_first_breaks_ties_at_random():
    orders = {tuple(RarestFirstPicker().order(set(range(8)), dict.fromkeys(range(8), 1))) for _ in range(20)}
    assert len(orders) > 1


def test_rarest_first_takes_a_piece_only_the_seed_holds_before_one_a_peer_holds():
    # the fetch loop counts a seed as half a holder: its link is the one way new pieces come in
    order = RarestFirstPicker().order({1, 2, 3}, {1: 1, 2: 0.5, 3: 1.5})
    assert order == [2, 1, 3]


def test_rarest_first_breaks_ties_with_the_generator_it_is_handed():
    import random

    def order(seed: int) -> list[int]:
        return RarestFirstPicker(rng=random.Random(seed)).order(set(range(8)), dict.fromkeys(range(8), 1))

    assert order(3) == order(3)
    assert len({tuple(order(seed)) for seed in range(6)}) > 1
