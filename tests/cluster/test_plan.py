"""The epoch plan: exactly once, balanced, equal step counts, deterministic."""

import itertools

import numpy as np
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


def _lengths(sizes, seed=0):
    """Prompt lengths per shard (for bucketing), 20-400 tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 400, n) for n in sizes]


def _trained(sizes, world, epoch, stages, delivered, bucketing=None):
    """Positions a group of ``world`` ranks trained of ``epoch`` (after ``stages``), each rank ``delivered[r]``."""
    lists = plan.epoch_positions(sizes, world, seed=5, epoch=epoch, stages=stages, bucketing=bucketing)
    return [p for lst, d in zip(lists, delivered) for p in lst[:d]], lists


@pytest.mark.parametrize("sizes,path", [([50, 50, 50, 13], [(2, 4 * 3), (1, 0)]),
                                        ([20, 20, 7], [(1, 4 * 5), (3, 0)]),
                                        ([30, 30, 30, 30], [(4, 8), (2, 12), (3, 0)]),
                                        ([9, 9], [(2, 8), (1, 0)])])
@pytest.mark.parametrize("bucketed", [False, True])
def test_an_epoch_resumed_with_other_world_sizes_trains_every_sample_exactly_once(sizes, path, bucketed):
    """W ranks train part of an epoch, then W' ranks (re-planned from the W cursors through ``regroup``) and
    so on; the last group trains the rest: every position of the split exactly once, balanced lists; also
    with every group's lists reordered by length (the tails taken are those of the reordered lists)."""
    bucketing = plan.Bucketing(_lengths(sizes), batch_size=4, window=2) if bucketed else None
    world, per_rank = path[0]
    cursors = [{"epoch": 2, "delivered": per_rank, "seed": 5, "world_size": world, "batch_size": 4, "shards": "f",
                "rng": {}} for _ in range(world)]
    seen, lists = _trained(sizes, world, 2, [], [per_rank] * world, bucketing)
    assert [len(lst) for lst in lists] == plan.quotas(sum(sizes), world)
    for world, per_rank in path[1:]:
        cursors = plan.regroup(cursors, world)
        stages = cursors[0]["stages"]
        assert all(c["world_size"] == world and c["delivered"] == 0 and c["stages"] == stages for c in cursors)
        left = plan.left_in_epoch(sizes, 5, 2, stages)
        assert left == sum(sizes) - len(seen)
        got, lists = _trained(sizes, world, 2, stages, [per_rank or 10 ** 9] * world, bucketing)
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


def _waste(order, keys, batch):
    """Padded slots of ``order`` cut into batches of ``batch``: each batch padded to its longest."""
    return sum(len(c) * max(keys[i] for i in c) - sum(keys[i] for i in c)
               for c in (order[k:k + batch] for k in range(0, len(order), batch)))


def test_bucketing_sorts_each_window_into_batches_of_near_equal_length_and_shuffles_them():
    keys = list(np.random.default_rng(1).integers(20, 400, 103))
    order = list(range(103))                      # entries are their own key index here
    out = plan.bucket(order, keys, batch_size=4, window=5, rng=np.random.default_rng(0))
    assert sorted(out) == order and out[100:] == [100, 101, 102]          # the part batch stays last, as it was
    assert out == plan.bucket(order, keys, 4, 5, np.random.default_rng(0))      # a function of the generator
    for start in range(0, 100, 20):               # each window: its own samples, cut from their sorted order
        window = out[start:start + 20]
        assert sorted(window) == list(range(start, start + 20))
        ranked = sorted(window, key=lambda i: (keys[i], i))
        chunks = [ranked[k:k + 4] for k in range(0, 20, 4)]
        batches = [window[k:k + 4] for k in range(0, 20, 4)]
        assert sorted(map(sorted, batches)) == sorted(map(sorted, chunks))
    firsts = [min(keys[i] for i in out[k:k + 4]) for k in range(0, 100, 4)]
    assert firsts != sorted(firsts)                # the batches are not served shortest first
    assert _waste(out, keys, 4) < 0.25 * _waste(order, keys, 4)


def _step_lengths(lists, sizes, bucketing, world, batch):
    """Per step, each rank's longest prompt: (steps, world)."""
    owned = [plan.owned_positions(sizes, r, world) for r in range(world)]
    steps = plan.steps_per_epoch(sum(sizes), world, batch)
    return np.array([[max([bucketing.key(owned[o][i]) for o, i in b] or [0]) for b in plan.batches(lst, steps, batch)]
                     for lst in lists]).T


def test_step_order_gives_every_rank_batches_of_similar_length_at_each_step():
    """A step waits for its slowest rank: with order "step" every rank takes, at each step, the batch of the
    same length rank in its window, so the ranks' longest prompts per step are close; with the old per-rank
    order ("rank") they are as far apart as two random batches of a window."""
    sizes, world, batch = [60] * 8, 4, 4
    lengths = _lengths(sizes)
    gaps = {}
    for order in plan.ORDERS:
        bucketing = plan.Bucketing(lengths, batch_size=batch, window=6, order=order)
        lists = plan.epoch_lists(sizes, world, 7, 1, bucketing)
        per_step = _step_lengths(lists, sizes, bucketing, world, batch)
        gaps[order] = float((per_step.max(1) - per_step.min(1)).mean())
        if order == "step":       # the same permutation of each rank's sorted window: the same length ranks
            ranks = [np.argsort(np.argsort(per_step[k:k + 6, r], kind="stable"), kind="stable")
                     for k in range(0, 54, 6) for r in range(world)]
            assert sum((a != b).sum() for a, b in zip(ranks[::world], ranks[1::world])) < 0.2 * 54
    assert gaps["step"] < 0.4 * gaps["rank"], gaps
    with pytest.raises(ValueError, match="unknown bucket order 'steps'"):
        plan.Bucketing(lengths, batch, 6, "steps")


def test_a_cursor_written_before_the_step_order_resumes_in_its_per_rank_order():
    old = {"epoch": 1, "delivered": 8, "seed": 7, "world_size": 2, "batch_size": 4, "shards": "x", "rng": {},
           "bucket_window": 3}
    assert plan.Cursor.from_dict(old).bucket_order == "rank"
    sizes = [30, 30, 11]
    lengths = _lengths(sizes, 3)
    legacy = plan.epoch_lists(sizes, 2, 7, 1, plan.Bucketing(lengths, 4, 3, "rank"))
    for r, lst in enumerate(plan.epoch_lists(sizes, 2, 7, 1)):   # the generator the old code seeded per rank
        keys = [int(np.concatenate([lengths[s] for s in plan.owned_shards(3, o, 2)])[i]) for o, i in lst]
        assert legacy[r] == plan.bucket(lst, keys, 4, 3, np.random.default_rng([7, 1, r, 1, 0]))
    assert legacy != plan.epoch_lists(sizes, 2, 7, 1, plan.Bucketing(lengths, 4, 3))
    regrouped = plan.regroup([dict(old), dict(old, delivered=4)], 3)
    assert all(plan.Cursor.from_dict(c).bucket_order == "rank" for c in regrouped)


def test_bucketed_epoch_lists_reorder_each_ranks_own_list_and_nothing_else():
    sizes = [30, 30, 11]
    bucketing = plan.Bucketing(_lengths(sizes, 3), batch_size=4, window=3)
    plain, bucketed = plan.epoch_lists(sizes, 2, 7, 1), plan.epoch_lists(sizes, 2, 7, 1, bucketing)
    assert [sorted(a) for a in plain] == [sorted(b) for b in bucketed] and plain != bucketed
    assert bucketed == plan.epoch_lists(sizes, 2, 7, 1, bucketing)
    owned = [plan.owned_positions(sizes, r, 2) for r in range(2)]
    for lst, before in zip(bucketed, plain):
        keys = {ref: bucketing.key(owned[ref[0]][ref[1]]) for ref in lst}
        assert _waste(lst, keys, 4) < _waste(before, keys, 4)
    assert plan.replanned_lists(sizes, 2, 7, 1, [], bucketing) == bucketed
    positions = plan.epoch_positions(sizes, 2, 7, 1, bucketing=bucketing)
    assert positions == [[owned[o][i] for o, i in lst] for lst in bucketed]
