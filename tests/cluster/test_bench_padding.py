"""What benchmarks/padding.py's figures rest on: the waste of the batches the actors' plan makes, against a
direct count, with and without bucketing and rounding."""

import numpy as np

from cluster import plan

from ..conftest import load_benchmark


def test_waste_counts_each_batchs_slots_beyond_its_prompts():
    bench = load_benchmark("padding")
    lengths = [np.array([5, 3, 9]), np.array([4, 4])]           # one rank owns both shards
    order = plan.epoch_lists([3, 2], 1, 0, 0)[0]
    n = [int(np.concatenate(lengths)[i]) for _, i in order]
    batches = [n[0:2], n[2:4], n[4:]]
    for multiple in (1, 8):
        want = sum(len(b) * (-(-max(b) // multiple) * multiple) - sum(b) for b in batches)
        slots = sum(len(b) * (-(-max(b) // multiple) * multiple) for b in batches)
        assert bench.waste(lengths, 1, 2, 0, 0, multiple) == (want, 25, 0, slots)   # one rank never waits
    # bucketed in one window of 2 batches: the 4 samples of the first two batches sorted, then the part batch
    padded, real, idle, _ = bench.waste(lengths, 1, 2, 0, 2, 1)
    head = sorted(n[:4])
    assert real == 25 and padded == (head[1] - head[0]) + (head[3] - head[2]) and idle == 0


def test_idle_counts_each_ranks_slots_below_its_steps_longest_batch():
    bench = load_benchmark("padding")
    rng = np.random.default_rng(3)
    lengths = [rng.integers(10, 200, 40) for _ in range(4)]
    for window, order in ((0, "step"), (4, "step"), (4, "rank")):
        bucketing = plan.Bucketing(lengths, 4, window, order) if window else None
        lists = plan.epoch_lists([40] * 4, 2, 0, 1, bucketing)
        owned = [np.concatenate([lengths[s] for s in plan.owned_shards(4, r, 2)]) for r in range(2)]
        width = np.array([[4 * max(owned[o][i] for o, i in b) for b in plan.batches(lst, 20, 4)]
                          for lst in lists])                        # (ranks, steps): B x T each
        _, _, idle, slots = bench.waste(lengths, 2, 4, 1, window, 1, order)
        assert idle == int((width.max(0) - width).sum()) and slots == int(2 * width.max(0).sum())
    step, rank = (bench.waste(lengths, 2, 4, 1, 4, 1, o) for o in ("step", "rank"))
    assert step[:2] == rank[:2] and step[2] < rank[2]            # the same batches; less waiting
