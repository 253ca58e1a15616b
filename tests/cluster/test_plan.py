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


def _trained(sizes, world, epoch, stages, delivered):
    """Positions a group of ``world`` ranks trained of ``epoch`` (after ``stages``), each rank ``delivered[r]``."""
    lists = plan.epoch_positions(sizes, world, seed=5, epoch=epoch, stages=stages)
    return [p for lst, d in zip(lists, delivered) for p in lst[:d]], lists


@pytest.mark.parametrize("sizes,path", [([50, 50, 50, 13], [(2, 4 * 3), (1, 0)]),
                                        ([20, 20, 7], [(1, 4 * 5), (3, 0)]),
                                        ([30, 30, 30, 30], [(4, 8), (2, 12), (3, 0)]),
                                        ([9, 9], [(2, 8), (1, 0)])])
def test_an_epoch_resumed_with_other_world_sizes_trains_every_sample_exactly_once(sizes, path):
    """W ranks train part of an epoch, then W' ranks (re-planned from the W cursors through ``regroup``) and
    so on; the last group trains the rest: every position of the split exactly once, balanced lists."""
    world, per_rank = path[0]
    cursors = [{"epoch": 2, "delivered": per_rank, "seed": 5, "world_size": world, "batch_size": 4, "shards": "f",
                "rng": {}} for _ in range(world)]
    seen, lists = _trained(sizes, world, 2, [], [per_rank] * world)
    assert [len(lst) for lst in lists] == plan.quotas(sum(sizes), world)
    for world, per_rank in path[1:]:
        cursors = plan.regroup(cursors, world)
        stages = cursors[0]["stages"]
        assert all(c["world_size"] == world and c["delivered"] == 0 and c["stages"] == stages for c in cursors)
        left = plan.left_in_epoch(sizes, 5, 2, stages)
        assert left == sum(sizes) - len(seen)
        got, lists = _trained(sizes, world, 2, stages, [per_rank or 10 ** 9] * world)
        assert [len(lst) for lst in lists] == plan.quotas(left, world)
        seen += got
        cursors = [dict(c, delivered=per_rank) for c in cursors]
    assert sorted(seen) == [(s, j) for s, n in enumerate(sizes) for j in range(n)]      # all, each once


def test_replanned_lists_index_the_owners_samples_and_prefer_their_own_shards():
    sizes = [10, 10, 10, 10]
    stages = [{"world_size": 4, "delivered": [4, 4, 4, 4]}]
    pos = plan.epoch_positions(sizes, 2, 0, 0, stages)
    refs = plan.replanned_lists(sizes, 2, 0, 0, stages)
    owned = [plan.owned_positions(sizes, r, 2) for r in range(2)]
    assert [[owned[o][i] for o, i in lst] for lst in refs] == pos
    assert all(o == r for r, lst in enumerate(refs) for o, _ in lst)       # balanced shards: no peer fetch
    # without stages: the plain plan, unchanged
    assert plan.replanned_lists(sizes, 2, 0, 0, []) == plan.epoch_lists(sizes, 2, 0, 0)


def test_regroup_keeps_same_size_groups_and_epoch_ends_and_refuses_inconsistent_cursors():
    c = {"epoch": 0, "delivered": 8, "seed": 0, "world_size": 2, "batch_size": 4, "shards": "f", "rng": {}}
    assert plan.regroup([c, c], 2) == [c, c]
    assert plan.regroup([None, None], 3) == [None, None, None]
    with pytest.raises(ValueError, match="mix ranks"):
        plan.regroup([c, None], 1)
    with pytest.raises(ValueError, match="disagree"):
        plan.regroup([c, dict(c, epoch=1)], 1)
    old = plan.Cursor.from_dict({k: v for k, v in c.items()})          # a cursor saved before stages existed
    assert old.stages == []
