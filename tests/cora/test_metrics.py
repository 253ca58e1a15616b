"""Tests for cora.metrics against sklearn references and brute-force ranking."""

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cora.metrics import UAUCResult, auc, evaluate, ranking, uauc


def _random_case(rng, tie_decimals=None):
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # guarantee both classes
    rng.shuffle(y)
    s = rng.normal(size=n) + 0.7 * y
    if tie_decimals is not None:
        s = np.round(s, tie_decimals)
    return y, s


def _ref_uauc(users, y, s):
    vals, skipped = [], 0
    for u in np.unique(users):
        m = users == u
        if len(np.unique(y[m])) < 2:
            skipped += 1
            continue
        vals.append(roc_auc_score(y[m], s[m]))
    return float(np.mean(vals)), len(vals), skipped


# ----------------------------------------------------------------------------- auc vs sklearn
@pytest.mark.parametrize("tie_decimals", [None, 1, 0])
def test_auc_matches_sklearn(tie_decimals):
    rng = np.random.default_rng(1234 + (tie_decimals or 7))
    for _ in range(200):
        y, s = _random_case(rng, tie_decimals)
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_accepts_bool_labels_lists_and_int_scores():
    y = [True, False, True, False, False]
    s = [3, 1, 2, 2, 0]
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_large_input_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    s = np.round(rng.normal(size=y.size) + 0.3 * y, 2)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# ----------------------------------------------------------------------------- uauc vs sklearn loop
@pytest.mark.parametrize("seed", range(25))
def test_uauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 2000))
    n_users = int(rng.integers(2, 60))
    users = rng.integers(0, n_users, n) * 7 - 100  # arbitrary, negative, non-contiguous ids
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.5 * y, int(rng.integers(0, 3)))  # heavy ties
    # force some single-class users
    single = np.isin(users, np.unique(users)[:3])
    y[single] = 1
    ref, ref_n, ref_skipped = _ref_uauc(users, y, s)
    res = uauc(users, y, s)
    assert isinstance(res, UAUCResult)
    assert res.uauc == pytest.approx(ref, abs=1e-12)
    assert res.n_users == ref_n
    assert res.n_skipped == ref_skipped
    assert res.n_skipped >= 3


def test_uauc_string_users_and_shuffle_invariance():
    rng = np.random.default_rng(5)
    n = 500
    users = np.array([f"user_{i}" for i in rng.integers(0, 20, n)])
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n), 1)
    ref, ref_n, ref_skipped = _ref_uauc(users, y, s)
    res = uauc(users, y, s)
    assert (res.uauc, res.n_users, res.n_skipped) == (pytest.approx(ref, abs=1e-12), ref_n, ref_skipped)
    p = rng.permutation(n)
    assert uauc(users[p], y[p], s[p]).uauc == pytest.approx(res.uauc, abs=1e-12)


def test_uauc_ties_across_users_do_not_merge():
    # identical scores in different users must not share a tie run
    users = np.array([0, 0, 1, 1])
    y = np.array([0, 1, 1, 0])
    s = np.array([0.5, 0.9, 0.5, 0.9])
    res = uauc(users, y, s)
    assert res.uauc == pytest.approx(0.5)  # user 0: 1.0, user 1: 0.0
    assert (res.n_users, res.n_skipped) == (2, 0)


def test_uauc_result_is_frozen():
    res = uauc([0, 0], [0, 1], [0.1, 0.2])
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'uauc'"):
        res.uauc = 0.0  # type: ignore[misc]
    assert res.uauc == 1.0


def test_uauc_no_user_with_both_classes_raises():
    with pytest.raises(ValueError, match=r"none of the 3 users.*3 skipped"):
        uauc([1, 2, 3, 3], [0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])


# ----------------------------------------------------------------------------- edge cases
def test_perfect_reversed_and_constant():
    y = np.array([0, 0, 0, 1, 1])
    assert auc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert auc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert auc(y, np.full(5, 0.42)) == 0.5
    users = [0, 0, 0, 1, 1, 1]
    yy = [0, 1, 1, 1, 0, 0]
    assert uauc(users, yy, np.zeros(6)).uauc == 0.5
    assert uauc(users, yy, [0, 1, 1, 1, 0, 0]).uauc == 1.0


def test_error_empty():
    with pytest.raises(ValueError, match="labels is empty"):
        auc([], [])


def test_error_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"labels has 3 elements but scores has 2"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"users has 2 elements but labels has 3"):
        uauc([1, 2], [0, 1, 1], [0.1, 0.2, 0.3])


def test_error_bad_labels_shows_values():
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        auc([0, 1, 2, -1], [0.1, 0.2, 0.3, 0.4])
    # at most 5 offending values shown
    with pytest.raises(ValueError, match=r"7 other values, e.g. \[2, 3, 4, 5, 6\]") as ei:
        auc([0, 1, 2, 3, 4, 5, 6, 7, 8], np.arange(9.0))
    assert "7," not in str(ei.value).split("e.g.")[1]


def test_error_nonfinite_scores_counted():
    with pytest.raises(ValueError, match=r"2 non-finite values"):
        auc([0, 1, 0, 1], [0.1, np.nan, np.inf, 0.3])
    with pytest.raises(ValueError, match=r"1 non-finite"):
        uauc([0, 0], [0, 1], [np.nan, 0.3])


def test_error_single_class_message():
    with pytest.raises(ValueError, match=r"AUC is undefined: all 37 labels are 1; "
                                         r"need at least one positive and one negative"):
        auc(np.ones(37, dtype=int), np.arange(37.0))
    with pytest.raises(ValueError, match=r"all 4 labels are 0"):
        auc(np.zeros(4), np.arange(4.0))


def test_error_2d_input():
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        auc([[0, 1], [1, 0]], [[0.1, 0.2], [0.3, 0.4]])


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_warm_cold_split_matches_direct():
    rng = np.random.default_rng(42)
    n = 3000
    users = rng.integers(0, 80, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.4 * y, 1)
    cold = rng.random(n) < 0.3
    out = evaluate(y, s, users, cold=cold)
    assert out["n"] == n
    assert out["auc"] == pytest.approx(auc(y, s), abs=1e-12)
    full = uauc(users, y, s)
    assert out["uauc"] == pytest.approx(full.uauc, abs=1e-12)
    assert (out["n_users"], out["n_users_skipped"]) == (full.n_users, full.n_skipped)
    for name, m in (("warm", ~cold), ("cold", cold)):
        sub = out[name]
        assert sub["n"] == int(m.sum())
        assert sub["auc"] == pytest.approx(roc_auc_score(y[m], s[m]), abs=1e-12)
        ref, ref_n, ref_skipped = _ref_uauc(users[m], y[m], s[m])
        assert sub["uauc"] == pytest.approx(ref, abs=1e-12)
        assert (sub["n_users"], sub["n_users_skipped"]) == (ref_n, ref_skipped)
        assert "note" not in sub
    assert out["warm"]["n"] + out["cold"]["n"] == n
    json.dumps(out)


def test_evaluate_all_warm_gives_empty_cold_with_note():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8])
    out = evaluate(y, s, [1, 1, 2, 2], cold=np.zeros(4, dtype=bool))
    assert out["cold"]["auc"] is None and out["cold"]["uauc"] is None
    assert out["cold"]["n"] == 0
    assert "no samples" in out["cold"]["note"]
    assert out["warm"]["auc"] == 1.0 and out["warm"]["uauc"] == 1.0
    s_json = json.dumps(out)
    assert json.loads(s_json)["cold"]["auc"] is None


def test_evaluate_single_class_subset_reports_note_not_raise():
    y = np.array([0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.3, 0.4, 0.2, 0.8])
    users = np.array([0, 0, 1, 1, 2, 2])
    cold = np.array([False, False, True, True, False, False])
    out = evaluate(y, s, users, cold=cold)
    assert out["cold"]["auc"] is None and out["cold"]["uauc"] is None
    assert out["cold"]["n"] == 2 and out["cold"]["n_users_skipped"] == 1
    assert "all 2 labels are 1" in out["cold"]["note"]
    assert out["warm"]["n_users"] == 2
    json.dumps(out)


def test_evaluate_auc_defined_but_uauc_undefined():
    out = evaluate([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], ["a", "b", "c", "d"])
    assert out["auc"] == pytest.approx(0.75)
    assert out["uauc"] is None and "UAUC is undefined" in out["note"]
    assert (out["n_users"], out["n_users_skipped"]) == (0, 4)


def test_evaluate_without_cold_has_no_split_and_is_json_native():
    out = evaluate([0, 1, 1], [0.2, 0.4, 0.1], [7, 7, 7])
    assert "warm" not in out and "cold" not in out
    assert set(out) == {"auc", "uauc", "n", "n_users", "n_users_skipped"}
    for k in ("n", "n_users", "n_users_skipped"):
        assert type(out[k]) is int
    assert type(out["auc"]) is float and type(out["uauc"]) is float
    json.dumps(out)


def test_evaluate_rejects_bad_cold_mask():
    with pytest.raises(ValueError, match="cold has 2 elements but labels has 3"):
        evaluate([0, 1, 1], [0.2, 0.4, 0.1], [1, 1, 1], cold=[True, False])
    with pytest.raises(ValueError, match="cold must be a boolean mask"):
        evaluate([0, 1, 1], [0.2, 0.4, 0.1], [1, 1, 1], cold=[0, 2, 1])


# ----------------------------------------------------------------------------- ranking vs brute force
def _brute_query(labels, scores, ks):
    """Every order of the candidates that sorts the scores descending (ties in all orders), equally likely."""
    n = len(scores)
    vals = {**{f"recall@{k}": [] for k in ks}, **{f"ndcg@{k}": [] for k in ks}, "mrr": []}
    for perm in itertools.permutations(range(n)):
        if any(scores[perm[i]] < scores[perm[i + 1]] for i in range(n - 1)):
            continue
        rank = 1 + [labels[j] for j in perm].index(1)
        for k in ks:
            vals[f"recall@{k}"].append(float(rank <= k))
            vals[f"ndcg@{k}"].append(1 / math.log2(rank + 1) if rank <= k else 0.0)
        vals["mrr"].append(1 / rank)
    return {name: sum(v) / len(v) for name, v in vals.items()}


def _brute_ranking(queries, labels, scores, ks, users=None):
    queries, labels, scores = map(np.asarray, (queries, labels, scores))
    per_q = {q: _brute_query(labels[queries == q].tolist(), scores[queries == q].tolist(), ks)
             for q in np.unique(queries)}
    names = list(next(iter(per_q.values())))
    out = {name: float(np.mean([v[name] for v in per_q.values()])) for name in names}
    if users is not None:
        users = np.asarray(users)
        q_user = {q: users[queries == q][0] for q in per_q}
        by_user = {u: [q for q in per_q if q_user[q] == u] for u in set(q_user.values())}
        for name in names:
            out[f"user_{name}"] = float(np.mean([np.mean([per_q[q][name] for q in qs]) for qs in by_user.values()]))
    return out


def _assert_close(got, ref):
    for name, v in ref.items():
        assert got[name] == pytest.approx(v, abs=1e-12), name


def test_ranking_hand_made_ties():
    # query 0: positive tied with one negative, one negative below -> rank 1 or 2
    # query 1: positive below one negative, tied with two -> rank 2, 3 or 4 of 4
    # query 2: positive strictly first
    q = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    y = [1, 0, 0, 0, 1, 0, 0, 1, 0]
    s = [0.5, 0.5, 0.1, 0.9, 0.3, 0.3, 0.3, 2.0, -1.0]
    out = ranking(q, y, s, ks=(1, 2, 3))
    d = lambda r: 1 / math.log2(r + 1)  # noqa: E731
    assert out["recall@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["recall@2"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert out["recall@3"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert out["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + (1 / 2 + 1 / 3 + 1 / 4) / 3 + 1) / 3)
    assert out["ndcg@3"] == pytest.approx(((d(1) + d(2)) / 2 + (d(2) + d(3)) / 3 + 1) / 3)
    assert (out["n_queries"], out["n_candidates"]) == (3, 3.0)
    _assert_close(out, _brute_ranking(q, y, s, (1, 2, 3)))


def test_ranking_positive_tied_with_all_negatives():
    n = 6
    out = ranking(np.zeros(n, int), [0, 0, 1, 0, 0, 0], np.full(n, 0.25), ks=(1, 3, 6))
    assert out["recall@1"] == pytest.approx(1 / 6) and out["recall@3"] == pytest.approx(0.5)
    assert out["recall@6"] == 1.0
    assert out["mrr"] == pytest.approx(sum(1 / r for r in range(1, 7)) / 6)
    assert out["ndcg@3"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 4)) / 6)
    _assert_close(out, _brute_ranking(np.zeros(n, int), [0, 0, 1, 0, 0, 0], np.full(n, 0.25), (1, 3, 6)))


def test_ranking_user_with_one_query_counts_as_much_as_a_busy_user():
    # user "a": one query, positive first; user "b": three queries, positive last of 2 each time
    q = [10, 10, 20, 20, 30, 30, 40, 40]
    y = [1, 0, 1, 0, 1, 0, 1, 0]
    s = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    users = ["a", "a", "b", "b", "b", "b", "b", "b"]
    out = ranking(q, y, s, ks=(1,), users=users)
    assert out["recall@1"] == pytest.approx(0.25) and out["user_recall@1"] == pytest.approx(0.5)
    assert out["mrr"] == pytest.approx((1 + 3 * 0.5) / 4) and out["user_mrr"] == pytest.approx(0.75)
    assert (out["n_queries"], out["n_users"], out["n_candidates"]) == (4, 2, 2.0)
    _assert_close(out, _brute_ranking(q, y, s, (1,), users))


def test_ranking_k_larger_than_the_candidate_count():
    q, y, s = [0, 0, 0], [0, 0, 1], [3.0, 2.0, 1.0]             # the positive is last of 3
    out = ranking(q, y, s, ks=(3, 100))
    assert out["recall@100"] == out["recall@3"] == 1.0
    assert out["ndcg@100"] == out["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert out["mrr"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(8))
def test_ranking_random_queries_with_many_ties_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    q, y, s, users = [], [], [], []
    for qi in range(60):
        n = int(rng.integers(2, 7))                              # 1 positive + 1..5 negatives
        lab = np.zeros(n, int)
        lab[rng.integers(n)] = 1
        q += [f"q{qi}"] * n
        y += lab.tolist()
        s += rng.integers(0, 3, n).tolist()                      # three values: ties everywhere
        users += [int(rng.integers(0, 12))] * n
    p = rng.permutation(len(q))                                  # rows of a query need not be adjacent
    q, y, s, users = (np.asarray(a)[p] for a in (q, y, s, users))
    out = ranking(q, y, s, ks=(1, 2, 5, 10), users=users)
    _assert_close(out, _brute_ranking(q, y, s, (1, 2, 5, 10), users))
    assert out["n_queries"] == 60 and out["n_users"] == len(np.unique(users))
    json.dumps(out)


def test_ranking_rejects_bad_queries_naming_them():
    with pytest.raises(ValueError, match=r"2 of 3 queries do not have exactly one positive and at least one "
                                         r"negative: 'b' \(2 positive\(s\) of 3 rows\), 'c' \(1 positive\(s\) of 1 rows\)"):
        ranking(["a", "a", "b", "b", "b", "c"], [1, 0, 1, 1, 0, 1], np.arange(6.0))
    with pytest.raises(ValueError, match=r"1 of 1 queries .* 7 \(0 positive\(s\) of 2 rows\)"):
        ranking([7, 7], [0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"7 of 7 queries .*, \.\.\.; a query is one positive"):
        ranking(np.arange(7), np.ones(7), np.arange(7.0))


def test_ranking_rejects_bad_input():
    with pytest.raises(ValueError, match=r"2 non-finite values"):
        ranking([0, 0, 0], [1, 0, 0], [0.1, np.nan, np.inf])
    with pytest.raises(ValueError, match=r"scores must be 1-D, got shape \(1, 2\)"):
        ranking([0, 0], [1, 0], [[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"queries has 3 elements but labels has 2"):
        ranking([0, 0, 0], [1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"users has 1 elements but labels has 2"):
        ranking([0, 0], [1, 0], [0.1, 0.2], users=[5])
    with pytest.raises(ValueError, match=r"labels must all be 0 or 1"):
        ranking([0, 0], [2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"queries contain 1 NaN ids"):
        ranking([0.0, np.nan], [1, 0], [0.1, 0.2])
    for ks in ((), (0, 5), (2.5,), (True,)):
        with pytest.raises(ValueError, match=r"ks must be a non-empty sequence of integers >= 1"):
            ranking([0, 0], [1, 0], [0.1, 0.2], ks=ks)
    with pytest.raises(ValueError, match=r"query 3 spans several users \(1 such queries\)"):
        ranking([3, 3, 4, 4], [1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], users=[1, 2, 1, 1])


def test_ranking_without_users_is_json_native_and_keyed_by_k():
    out = ranking([0, 0, 1, 1], [1, 0, 0, 1], [0.2, 0.1, 0.2, 0.1], ks=[10, 1, 10])
    assert list(out) == ["recall@1", "recall@10", "ndcg@1", "ndcg@10", "mrr", "n_queries", "n_candidates"]
    assert type(out["n_queries"]) is int and all(type(out[k]) is float for k in out if k != "n_queries")
    assert out["recall@1"] == 0.5 and out["mrr"] == 0.75
    json.dumps(out)


# ----------------------------------------------------------------------------- paired bootstrap
def test_weighted_auc_equals_the_auc_of_the_rows_repeated_ties_included():
    from cora.metrics import _by_score, _weighted_auc
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60).astype(np.float64)
    s = rng.integers(0, 6, 60).astype(np.float64)              # many ties
    w = rng.integers(0, 4, 60)
    want = auc(np.repeat(y, w), np.repeat(s, w))
    assert _weighted_auc(*_by_score(y, s), w.astype(np.float64)) == pytest.approx(want, abs=1e-12)


def test_paired_bootstrap_differences_intervals_and_undefined_cases():
    from cora.metrics import paired_bootstrap
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 10)
    y = rng.integers(0, 2, 300)
    good, noise = y + rng.normal(0, 0.5, 300), rng.normal(0, 1, 300)
    r = paired_bootstrap(users, y, good, noise, reps=300)
    assert r["n"] == 300 and r["users"] == 30 and r["reps"] == 300
    assert r["auc"]["diff"] == pytest.approx(auc(y, good) - auc(y, noise), abs=1e-12)
    assert r["uauc"]["diff"] == pytest.approx(uauc(users, y, good).uauc - uauc(users, y, noise).uauc, abs=1e-12)
    for key in ("auc", "uauc"):                    # clearly better: the whole interval above 0
        assert 0 < r[key]["low"] < r[key]["diff"] < r[key]["high"] and r[key]["p_not_above"] == 0.0
    assert paired_bootstrap(users, y, good, noise, reps=300) == r                      # seeded
    assert paired_bootstrap(users, y, good, noise, reps=300, seed=1)["auc"] != r["auc"]
    same = paired_bootstrap(users, y, noise, noise, reps=50)
    assert same["auc"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_not_above": 1.0, "dropped": 0}
    # one user per row and one class: AUC undefined, UAUC undefined (no user has both classes)
    one = paired_bootstrap([0, 1, 2], [1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], reps=20)
    assert one["auc"] is None and one["uauc"] is None
    with pytest.raises(ValueError, match="reps must be >= 1"):
        paired_bootstrap(users, y, good, noise, reps=0)
