"""The epoch plan: exactly once, balanced, equal step counts, deterministic."""

import itertools

import pytest

from cluster import plan


@pytest.mark.parametrize("sizes,world,batch", [([60] * 13 + [20], 2, 32), ([10, 10, 3], 3, 4),
                                               ([7], 1, 3), ([5, 5, 5, 1], 4, 2), ([100, 1], 2, 64)])
def test_every_sample_exactly_once_and_ranks_step_together(sizes, world, batch):
    total = sum(sizes)
    lists = plan.epoch_lists(sizes, world, seed=0, epoch=1)
    flat = [ref for lst in lists for ref in lst]
    owned = [sum(sizes[s] for s in plan.owned_shards(len(sizes), r, world)) for r in range(world)]
    assert sorted(flat) == sorted((r, i) for r in range(world) for i in range(owned[r]))
    assert [len(lst) for lst in lists] == plan.quotas(total, world)
    assert max(map(len, lists)) - min(map(len, lists)) <= 1
    steps = plan.steps_per_epoch(total, world, batch)
    for lst in lists:
        bs = plan.batches(lst, steps, batch)
        assert len(bs) == steps and list(itertools.chain(*bs)) == lst
        assert all(len(b) == batch for b in bs[:-1]) or steps == 1


def test_epochs_differ_and_repeat_with_the_seed():
    a = plan.epoch_lists([50, 50], 2, seed=3, epoch=0)
    assert a == plan.epoch_lists([50, 50], 2, seed=3, epoch=0)
    assert a != plan.epoch_lists([50, 50], 2, seed=3, epoch=1)
    assert a != plan.epoch_lists([50, 50], 2, seed=4, epoch=0)


def test_cursor_round_trip():
    c = plan.Cursor(epoch=2, delivered=64, seed=1, world_size=2, batch_size=32, shards="abc", rng={"seed": [1, 2, 0]})
    assert plan.Cursor.from_dict(c.to_dict()) == c
