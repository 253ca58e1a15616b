"""BDLM's shared store as Ray actors: sharded reads, synchronous commits, snapshot/load, against one StoreShard."""

import json

import numpy as np
import pytest
import ray

from cluster.store import start_store
from cora.bdlm import StoreShard

from .conftest import write_table


@pytest.fixture()
def cf_run(tmp_path):
    rng = np.random.default_rng(0)
    users, items = rng.standard_normal((11, 4)).astype(np.float32), rng.standard_normal((7, 4)).astype(np.float32)
    write_table(tmp_path / "user_embeddings.parquet", "user", users, rng.permutation(11))
    write_table(tmp_path / "item_embeddings.parquet", "item", items)
    (tmp_path / "cf.json").write_text(json.dumps({"model": "mf", "config": {"model": "mf"}}))
    return tmp_path, users, items


def test_the_sharded_store_reads_commits_and_restores_like_one_shard(ray_local, cf_run):
    out, users, items = cf_run
    store = start_store(str(out), world=2, shards=3, lr=0.1)
    assert list(store.bounds["user"]) == [0, 3, 7, 11]
    ids = np.array([10, 0, 3, 3, 6])
    rows, teacher = store.read("user", ids)
    np.testing.assert_array_equal(rows, users[ids])
    np.testing.assert_array_equal(teacher, users[ids])                 # an MF run: E and T start equal
    ref = {k: StoreShard(k, 0, len(t), t, t, 2, 0.1) for k, t in (("user", users), ("item", items))}
    rng = np.random.default_rng(1)
    saved = None
    for step in (1, 2, 3):
        grads = {r: {k: (rng.integers(0, n, 4), rng.standard_normal((4, 4)).astype(np.float32))
                     for k, n in (("user", 11), ("item", 7))} for r in (0, 1)}
        rec = (np.array([step, 9]), np.array([2, 4]), np.array([0.5 * step, -1.0]))
        store.push(step, 1, grads[1], records=rec)
        early = store.shards["user"][0].read.remote(np.array([0, 1, 2]), step)      # waits for rank 0's push
        ready, _ = ray.wait([early], timeout=0.5)
        assert not ready                                                # step not applied yet: the read waits
        store.push(step, 0, grads[0])
        for k in ("user", "item"):
            for r in (0, 1):
                ref[k].push(step, r, *grads[r][k], records=rec if (k == "user" and r == 1) else None)
        np.testing.assert_allclose(ray.get(early)[0], ref["user"].table[:3], rtol=0, atol=0)
        if step == 2:
            saved = store.snapshot(after=2)
    for k in ("user", "item"):
        np.testing.assert_array_equal(store.read(k, np.arange(ref[k].hi), after=3)[0], ref[k].table)
    users_rec, items_rec, logits = store.recorded(after=3)
    assert list(zip(users_rec, items_rec, logits)) == [(1, 2, 0.5), (2, 2, 1.0), (3, 2, 1.5), (9, 4, -1.0)]
    store.load(saved)                                                   # back to step 2, then step 3 again
    assert store.snapshot()["user.version"].tolist() == [2, 2, 2]
    assert len(store.recorded()[0]) == 3
    store.reset()
    np.testing.assert_array_equal(store.tables()["user"], users)
    assert store.snapshot()["item.version"].tolist() == [0, 0, 0]


def test_too_many_shards_are_refused_with_the_fix(ray_local, cf_run):
    out, _, _ = cf_run
    with pytest.raises(ValueError, match="bdlm.store_shards=9: cannot cut a table of 7 rows into 9 shards"):
        start_store(str(out), world=2, shards=9)
