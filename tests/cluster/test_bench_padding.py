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
        assert bench.waste(lengths, 1, 2, 0, 0, multiple) == (want, 25)
    # bucketed in one window of 2 batches: the 4 samples of the first two batches sorted, then the part batch
    padded, real = bench.waste(lengths, 1, 2, 0, 2, 1)
    head = sorted(n[:4])
    assert real == 25 and padded == (head[1] - head[0]) + (head[3] - head[2])
