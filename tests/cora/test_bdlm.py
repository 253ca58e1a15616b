"""cora.bdlm: the shared store's update and commit against a direct computation, and the domain phase."""

import numpy as np
import pytest
import torch

from cora.bdlm import BDLMConfig, StoreShard, apply_update, domain_phase


def _adam_reference(table, steps, lr, world):
    """Lazy Adam written out per row and step: every step's gradient is the mean over ranks of each rank's
    gradients summed per id; a row moves only in the steps that touch it, with its own step count."""
    table = table.astype(np.float64).copy()
    m, v, t = np.zeros_like(table), np.zeros_like(table), np.zeros(len(table))
    for pushes in steps:                                # pushes: per rank, (ids, grads)
        g = {}
        for ids, grads in pushes:
            for i, row in zip(ids, grads):
                g[int(i)] = g.get(int(i), 0.0) + row.astype(np.float64)
        for i, gi in g.items():
            gi = gi / world
            t[i] += 1
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.999 * v[i] + 0.001 * gi * gi
            table[i] -= lr * (m[i] / (1 - 0.9 ** t[i])) / (np.sqrt(v[i] / (1 - 0.999 ** t[i])) + 1e-8)
    return table


def _steps(rng, n, d, world, count):
    return [[(rng.integers(0, n, 5), rng.standard_normal((5, d)).astype(np.float32)) for _ in range(world)]
            for _ in range(count)]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_shard_applies_each_step_once_all_ranks_pushed_as_a_direct_computation(optimizer):
    rng = np.random.default_rng(0)
    n, d, world, lr = 12, 4, 3, 0.05
    base = rng.standard_normal((n, d)).astype(np.float32)
    steps = _steps(rng, n, d, world, 4)
    shard = StoreShard("user", 0, n, base, base * 2, world, lr, optimizer)
    for s, pushes in enumerate(steps, 1):
        for rank in (2, 0):                                 # out of rank order, and not yet complete
            assert shard.push(s, rank, *pushes[rank]) is False
            assert shard.version == s - 1
        before = shard.read(np.arange(n))[0].copy()
        assert shard.push(s, 1, *pushes[1]) is True and shard.version == s
        touched = np.unique(np.concatenate([p[0] for p in pushes]))
        after = shard.read(np.arange(n))[0]
        untouched = np.setdiff1d(np.arange(n), touched)
        np.testing.assert_array_equal(after[untouched], before[untouched])     # lazy: only the rows read move
    if optimizer == "adam":
        want = _adam_reference(base, steps, lr, world)
    else:
        want = base.astype(np.float64).copy()
        for pushes in steps:
            for ids, grads in pushes:
                np.add.at(want, ids, -lr * grads.astype(np.float64) / world)
    np.testing.assert_allclose(shard.read(np.arange(n))[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(shard.read(np.arange(n))[1], base * 2)       # the teacher rows are not trained


def test_the_result_does_not_depend_on_the_order_pushes_arrive_in():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((20, 3)).astype(np.float32)
    steps = _steps(rng, 20, 3, 4, 3)
    out = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        shard = StoreShard("item", 0, 20, base, base, 4, 0.1)
        for s, pushes in enumerate(steps, 1):
            for r in order:
                shard.push(s, r, *pushes[r])
        out.append(shard.snapshot()["table"])
    np.testing.assert_array_equal(out[0], out[1])                             # bit for bit


def test_snapshot_and_load_continue_exactly_and_records_are_kept():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((10, 2)).astype(np.float32)
    steps = _steps(rng, 10, 2, 2, 4)
    a = StoreShard("user", 0, 10, base, base, 2, 0.1)
    for s, pushes in enumerate(steps[:2], 1):
        a.push(s, 0, *pushes[0], records=(np.array([1, 3]), np.array([5, 6]), np.array([0.5, -1.0])))
        a.push(s, 1, *pushes[1], records=(np.array([3]), np.array([6]), np.array([2.0])))   # rank 1 wins (3, 6)
    saved = a.snapshot()
    b = StoreShard("user", 0, 10, base * 0, base * 0, 2, 0.1)
    b.load(saved)
    for s, pushes in enumerate(steps[2:], 3):
        for shard in (a, b):
            shard.push(s, 0, *pushes[0])
            shard.push(s, 1, *pushes[1])
    for k, v in a.snapshot().items():
        np.testing.assert_array_equal(b.snapshot()[k], v, err_msg=k)
    users, items, logits = b.recorded()
    assert users.tolist() == [1, 3] and items.tolist() == [5, 6] and logits.tolist() == [0.5, 2.0]


def test_a_shard_refuses_out_of_order_steps_twice_pushed_ranks_and_foreign_ids():
    shard = StoreShard("user", 10, 20, np.zeros((10, 2), np.float32), np.zeros((10, 2), np.float32), 2, 0.1)
    no = (np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="push of step 2 from rank 0, but the store is at step 0"):
        shard.push(2, 0, *no)
    shard.push(1, 0, *no)
    with pytest.raises(ValueError, match="rank 0 pushed step 1 twice"):
        shard.push(1, 0, *no)
    with pytest.raises(ValueError, match="user id 3 is outside this store shard's range 10..19"):
        shard.read(np.array([3]))


def test_apply_update_sgd_is_a_plain_step():
    table = np.ones((3, 2), np.float32)
    apply_update(table, None, None, None, np.array([1]), np.array([[2.0, -4.0]], np.float32), 0.5, "sgd")
    np.testing.assert_array_equal(table, [[1, 1], [0, 3], [1, 1]])


def test_bdlm_config_reports_every_bad_value_with_its_fix():
    problems = BDLMConfig(store_lr=0, mutual_weight=-1, store_shards=0, domain_layers=-2).validate()
    assert "store_lr must be > 0, got 0" in problems
    assert "mutual_weight must be >= 0 (0 turns it off), got -1" in problems
    assert "store_shards must be >= 1, got 0" in problems
    assert any("domain_layers must be >= 0 or null" in p for p in problems)


def test_the_domain_phase_trains_lightgcn_on_the_store_and_follows_the_llm(tmp_path):
    """The domain phase from the store's tables: deterministic, it moves the tables, and its mutual term pulls
    the domain model's logits of the recorded pairs towards the LLM's."""
    from cora.cf.data import CFData, Split

    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        users, items = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
        labels = (torch.rand(n, generator=g) > 0.5).float()
        return Split(users, items, labels, torch.arange(n), torch.zeros(n, dtype=bool))
    data = CFData(6, 5, split(60, 0), split(30, 1), split(30, 2))
    rng = np.random.default_rng(0)
    user, item = (rng.standard_normal((k, 4)).astype(np.float32) * 0.1 for k in (6, 5))
    pairs = torch.stack([data.train.users, data.train.items]).unique(dim=1)
    far = np.full(pairs.shape[1], 6.0, np.float32)                     # the LLM is sure every train pair is liked
    cfg = BDLMConfig(domain_epochs=30, domain_lr=0.05, domain_batch_size=16, domain_mutual_weight=0.0)
    plain = domain_phase(user, item, data, (pairs[0].numpy(), pairs[1].numpy(), far), cfg, 1, seed=3)
    again = domain_phase(user, item, data, (pairs[0].numpy(), pairs[1].numpy(), far), cfg, 1, seed=3)
    np.testing.assert_array_equal(plain.user, again.user)
    assert not np.allclose(plain.user, user) and np.isfinite(plain.loss) and 0 <= plain.test["auc"] <= 1
    cfg.domain_mutual_weight = 5.0
    mutual = domain_phase(user, item, data, (pairs[0].numpy(), pairs[1].numpy(), far), cfg, 1, seed=3)
    mean = lambda r: float((r.teacher_user[pairs[0]] * r.teacher_item[pairs[1]]).sum(-1).mean())  # noqa: E731
    assert mean(mutual) > mean(plain) + 0.5
    np.testing.assert_array_equal(user, user)                          # inputs are not modified


@pytest.mark.parametrize("model", ["lightgcn", "mf"])
def test_the_store_starts_from_a_lightgcn_runs_layer_0_tables_with_its_propagated_ones_as_teacher(tmp_path, model):
    """A LightGCN run's E is its layer-0 tables (model.safetensors) and T its propagated vector tables, so the
    first teacher scores exactly as the CF run does; any other run's E and T are both its vector tables."""
    from safetensors.torch import load_file

    from cora.bdlm import initial_tables
    from cora.cf.store import read_embeddings
    from trainer.cli import main
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp_path / "data"), "--users", "20", "--items",
                 "15", "--interactions", "200", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(tmp_path / "data"), "--model", model, "--out", str(tmp_path / "cf"),
                 "--dim", "4", "--epochs", "2", "--no-progress"]) == 0
    got = initial_tables(str(tmp_path / "cf"))
    state = load_file(str(tmp_path / "cf" / "model.safetensors"))
    for key in ("user", "item"):
        base, teacher = got[key]
        np.testing.assert_array_equal(teacher, read_embeddings(tmp_path / "cf" / f"{key}_embeddings.parquet"))
        np.testing.assert_array_equal(base, state[f"{key}_emb.weight"].numpy())
        assert (model == "mf") == np.array_equal(base, teacher)
    assert got["layers"] == (2 if model == "lightgcn" else None)
