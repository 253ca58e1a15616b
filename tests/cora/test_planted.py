"""The sequential rule of synthetic data (`cora prepare --source synthetic --rule sequential`,
cora/data/planted.py): labels recomputed exactly from the planted factors and the samples' stored
histories, a signal that static per-user/per-item scores miss, within-domain histories for multi-domain
data, reproducible and recorded; bad values refused."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cora.data import planted
from cora.data.domains import planted_factors
from cora.data.schema import SPLITS

from .test_domains import MULTI, prepare_pair
from .test_sources import prepare

# noise 0: a label is exactly 1[s > 0]; --window 3 with 4 stored positives: the rule reads the last 3
EXACT = ("--source", "synthetic", "--rule", "sequential", "--window", 3, "--users", 30, "--items", 40,
         "--interactions", 900, "--factors", 6, "--noise", 0, "--seed", 2, "--history-stored", 4,
         "--history-in-prompt", 2, "--samples-per-shard", 500)


def rows(d):
    """All samples of a directory in sample-id (= time) order (+ their split), with the planted-factor row
    of each user and item id (raw ids u<k>, i<k> or <domain>-i<k>)."""
    f = pd.concat([pq.read_table(d / f"{s}.parquet").to_pandas().assign(split=s) for s in SPLITS])
    f = f.sort_values("sample_id")
    users = pq.read_table(d / "users.parquet").column("raw_id").to_pylist()
    items = pq.read_table(d / "items.parquet").column("raw_id").to_pylist()
    user_row = np.array([int(r[1:]) for r in users])
    item_row = np.array([int(r.rsplit("i", 1)[1]) for r in items])
    return f.reset_index(drop=True), user_row, item_row


def replayed_scores(f, user_row, item_row, uf, vf, window):
    """s = v . m / |m| per sample, m = the mean factor of the last ``window`` items of its stored history
    (the user's factor when empty); ``vf``: {domain: item factors}."""
    out = []
    for r in f.itertuples():
        v = vf[getattr(r, "domain", None) or next(iter(vf))]
        h = item_row[np.asarray(r.history, dtype=np.int64)[-window:]]
        m = v[h].mean(0) if len(h) else uf[user_row[r.user]]
        out.append(v[item_row[r.item]] @ (m / np.linalg.norm(m)))
    return np.array(out)


def check_histories_are_earlier_positives(f, keep):
    """Every stored history = the user's (per domain) earlier positives in time order, the last ``keep``."""
    seen: dict[tuple, list[int]] = {}
    for r in f.itertuples():
        key = (r.user, getattr(r, "domain", None))
        assert list(r.history) == seen.get(key, [])[-keep:]
        if r.label:
            seen.setdefault(key, []).append(r.item)


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "exact"
    return out, prepare(out, *EXACT)


def test_labels_are_the_rule_applied_to_the_stored_histories(exact):
    out, ds = exact
    f, user_row, item_row = rows(out)
    check_histories_are_earlier_positives(f, 4)
    uf, vf = planted_factors(ds)
    s = replayed_scores(f, user_row, item_row, uf, vf, 3)
    np.testing.assert_array_equal(f["label"].to_numpy(), (s > 0).astype(np.int8))
    assert 0.3 < f["label"].mean() < 0.7 and (f["history"].map(len) == 4).mean() > 0.6
    wrong_window = replayed_scores(f, user_row, item_row, uf, vf, 4)   # the window matters: 4 is not the rule
    assert ((wrong_window > 0) != f["label"].to_numpy()).mean() > 0.1


def test_sequential_is_reproducible_recorded_and_shares_the_static_draws(exact, tmp_path):
    out, ds = exact
    assert ds["options"]["synthetic"]["rule"] == "sequential" and ds["options"]["synthetic"]["window"] == 3
    again = prepare(tmp_path / "again", *EXACT)
    assert again["files"] == ds["files"] and again["fingerprint"] == ds["fingerprint"]   # same seed, same bytes
    assert EXACT[2:6] == ("--rule", "sequential", "--window", 3)
    dot = prepare(tmp_path / "dot", *EXACT[:2], *EXACT[6:])                        # the same, rule dot
    assert dot["options"]["synthetic"]["rule"] == "dot" and "window" not in dot["options"]["synthetic"]
    a, b = rows(out)[0], rows(tmp_path / "dot")[0]
    cols = ["user", "item", "timestamp"]
    assert a[cols].equals(b[cols]) and not a["label"].equals(b["label"])          # only the labels differ
    other = prepare(tmp_path / "w2", *EXACT[:5], 2, *EXACT[6:])
    assert other["fingerprint"] != ds["fingerprint"] and other["options"]["synthetic"]["window"] == 2


def test_the_sequential_score_predicts_labels_that_static_scores_do_not(tmp_path):
    """With noise: the planted sequential score (from the stored histories) against every static score we
    can think of: the planted u . v, each user's and item's positive rate (in-sample: optimistic), their sum,
    and a per-user taste vector over the planted item factors fitted on the user's train rows (the best MF
    could do with perfect item factors)."""
    ds = prepare(tmp_path / "d", "--source", "synthetic", "--rule", "sequential", "--users", 60, "--items", 120,
                 "--interactions", 4800, "--factors", 8, "--noise", 0.3, "--seed", 1, "--history-in-prompt", 3)
    f, user_row, item_row = rows(tmp_path / "d")
    uf, vf = planted_factors(ds)
    v = vf["items"]
    y, u, i = f["label"].to_numpy(), user_row[f["user"].to_numpy()], item_row[f["item"].to_numpy()]
    seq = replayed_scores(f, user_row, item_row, uf, vf, 5)
    user_rate = pd.Series(y).groupby(u).transform("mean").to_numpy()
    item_rate = pd.Series(y).groupby(i).transform("mean").to_numpy()
    train, test = (f["split"] == "train").to_numpy(), (f["split"] == "test").to_numpy()
    fitted = np.zeros(len(y))
    for k in np.unique(u):
        x = np.c_[v[i[u == k]], np.ones((u == k).sum())]
        w = np.linalg.lstsq(x[train[u == k]], 2.0 * y[(u == k) & train] - 1, rcond=None)[0]
        fitted[u == k] = x @ w
    static = {"u.v": (uf[u] * v[i]).sum(1), "user rate": user_rate, "item rate": item_rate,
              "user + item rate": user_rate + item_rate, "fitted user taste": fitted}
    auc = {name: roc_auc_score(y[test], s[test]) for name, s in static.items()}
    assert roc_auc_score(y, seq) > 0.95 and roc_auc_score(y[test], seq[test]) > 0.95, auc
    assert max(auc.values()) < 0.7, auc


def test_multi_domain_sequential_reads_the_samples_own_domain(tmp_path):
    """--domains: the recent positives are the sample's own domain's (its stored history); the user's
    shared factor is the fallback in every domain."""
    ds = prepare_pair(tmp_path / "m", *MULTI, "--rule", "sequential", "--window", 2)
    uf, vf = planted_factors(ds["target"])
    for part in ("source", "target"):
        assert ds[part]["options"]["synthetic"]["window"] == 2 == ds[part]["multi_domain"]["synthetic"]["window"]
        f, user_row, item_row = rows(tmp_path / "m" / part)
        check_histories_are_earlier_positives(f, 6)
        s = replayed_scores(f, user_row, item_row, uf, vf, 2)
        np.testing.assert_array_equal(f["label"].to_numpy(), (s > 0).astype(np.int8))
    again = prepare_pair(tmp_path / "again", *MULTI, "--rule", "sequential", "--window", 2)
    assert all(again[p]["files"] == ds[p]["files"] for p in ("source", "target"))


def test_sequential_score_replays_users_in_time_order():
    """Unit check of planted.sequential_score against a plain per-row loop, with ties in time."""
    rng = np.random.default_rng(0)
    uf, vf = rng.standard_normal((7, 4)), rng.standard_normal((11, 4))
    n = 300
    user, item, ts = rng.integers(0, 7, n), rng.integers(0, 11, n), rng.integers(0, 40, n)
    noise = 0.2 * rng.standard_normal(n)
    got = planted.sequential_score(uf, vf, user, item, ts, noise, 3)
    want, liked = np.empty(n), {}
    for r in sorted(range(n), key=lambda r: (ts[r], r)):
        h = liked.get(user[r], [])[-3:]
        m = vf[h].mean(0) if h else uf[user[r]]
        want[r] = vf[item[r]] @ m / np.linalg.norm(m) + noise[r]
        if want[r] > 0:
            liked.setdefault(user[r], []).append(item[r])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, want", [
    (("--rule", "sequential", "--window", 0), ["--window 0", "must be >= 1", "use e.g. --window 5"]),
    (("--window", 3), ["--window 3 is for --rule sequential", "drop --window"]),
    (("--rule", "additive", "--window", 3), ["--rule additive does not use it"]),
    (("--rule", "sequential", "--history-stored", 3, "--history-in-prompt", 2),
     ["--history-stored 3 is below --window 5", "use --history-stored 5 or more"]),
    (("--rule", "recent"), ["--rule 'recent' is not a synthetic rule; use dot, additive, sequential"]),
    (("--rule", "sequential", "--window", -2, "--domains", "movies,books", "--target-domain", "books"),
     ["--window -2", "must be >= 1"]),
])
def test_bad_sequential_values_are_refused(tmp_path, capsys, args, want):
    rc = prepare(tmp_path / "o", "--source", "synthetic", "--users", 10, "--items", 10, "--interactions", 50, *args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and all(w in err for w in want), err
    assert not (tmp_path / "o").exists()


def test_dataset_json_names_the_rule(exact):
    out, ds = exact
    assert json.loads((out / "dataset.json").read_text())["options"]["synthetic"] == {
        "users": 30, "items": 40, "interactions": 900, "factors": 6, "noise": 0.0, "rule": "sequential",
        "window": 3, "days": 365, "seed": 2}
