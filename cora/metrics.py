"""Metrics for recommender evaluation: AUC, user-averaged AUC (UAUC), warm/cold split, and the
top-K ranking metrics Recall@K, NDCG@K and MRR over candidate sets.

Plain numpy, fully vectorised (no Python loop over samples, users or queries).

Both AUCs use the Mann-Whitney form.  With the n = n_pos + n_neg scores ranked
ascending (1-based; tied scores all receive the average of the ranks they span)
and R_pos the sum of the ranks of the positives,

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)

which equals P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg) over all positive/negative
pairs, i.e. exactly the area under the ROC curve with ties drawn as diagonals
(what ``sklearn.metrics.roc_auc_score`` computes).  Twice an average rank is an
integer, so rank sums are accumulated exactly in int64 and divided once.

The ranking metrics (:func:`ranking`) are stated in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["auc", "uauc", "evaluate", "ranking", "UAUCResult"]


@dataclass(frozen=True)
class UAUCResult:
    """UAUC = (1/|U|) * sum_{u in U} AUC_u, where U = users having both classes.

    ``n_users`` = |U|; ``n_skipped`` = users whose labels are all one class.
    """

    uauc: float
    n_users: int
    n_skipped: int


# ----------------------------------------------------------------------------- validation
def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}; pass a flat array (e.g. x.ravel()).")
    if a.size == 0:
        raise ValueError(f"{name} is empty; the metrics need at least one positive and one negative sample.")
    return a


def _check_len(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {na} has {len(a)} elements but {nb} has {len(b)}; "
                         "they must be aligned one-to-one.")


def _labels(x) -> np.ndarray:
    y = _as_1d(x, "labels")
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise ValueError(f"labels must be numeric 0/1 or boolean, got dtype {y.dtype}; convert them to 0/1.")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        shown = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"labels must all be 0 or 1; found {int(bad.sum())} other values, e.g. {shown}; "
                         "binarise them first (e.g. labels = (rating >= threshold)).")
    return y.astype(np.int64)


def _scores(x) -> np.ndarray:
    s = _as_1d(x, "scores")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}.")
    s = s.astype(np.float64)
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        raise ValueError(f"scores contain {int(nonfinite.sum())} non-finite values (NaN/inf) out of {len(s)}; "
                         "fix the model output or drop those rows before computing metrics.")
    return s


def _id_index(x, name: str = "users", what: str = "user") -> tuple[np.ndarray, int]:
    """Map arbitrary (int or str) ids (of users, or queries) to 0..U-1 via np.unique(return_inverse)."""
    u = _as_1d(x, name)
    if u.dtype.kind == "f" and np.isnan(u).any():
        raise ValueError(f"{name} contain {int(np.isnan(u).sum())} NaN ids; every row needs a {what} id.")
    try:
        uniq, inv = np.unique(u, return_inverse=True)
    except TypeError as e:  # e.g. an object array mixing str and None
        raise ValueError(f"{name} could not be sorted/compared ({e}); use a single id type (int or str).") from e
    return inv.reshape(-1).astype(np.int64), len(uniq)


def _single_class_msg(y: np.ndarray) -> str | None:
    npos = int(y.sum())
    if 0 < npos < len(y):
        return None
    return (f"AUC is undefined: all {len(y)} labels are {1 if npos else 0}; "
            "need at least one positive and one negative")


# ----------------------------------------------------------------------------- cores (validated input)
def _auc_core(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="stable")
    ss, ys = s[order], y[order]
    n = len(ss)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], n]
    # run [starts, ends) covers 1-based ranks starts+1..ends; twice their mean is an integer
    rank2 = np.repeat(starts + 1 + ends, ends - starts)
    npos = int(ys.sum())
    nneg = n - npos
    r2 = int((rank2 * ys).sum())
    return (r2 - npos * (npos + 1)) / (2.0 * npos * nneg)


def _uauc_core(uid: np.ndarray, n_users: int, y: np.ndarray, s: np.ndarray):
    """Per-user AUC for every user id 0..n_users-1 (all present). Returns (auc_u, valid)."""
    order = np.lexsort((s, uid))  # primary key: user, secondary: score
    u, ss, ys = uid[order], s[order], y[order]
    n = len(u)
    new_group = np.r_[True, u[1:] != u[:-1]]
    new_run = new_group | np.r_[True, ss[1:] != ss[:-1]]  # tie run = equal (user, score)
    g_starts = np.flatnonzero(new_group)
    r_starts = np.flatnonzero(new_run)
    r_ends = np.r_[r_starts[1:], n]
    g_of_pos = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    gs = g_of_pos[r_starts]
    # within-group 1-based ranks of run: (r_start-gs+1)..(r_end-gs); twice their mean:
    rank2 = np.repeat((r_starts - gs + 1) + (r_ends - gs), r_ends - r_starts)
    r2 = np.add.reduceat(rank2 * ys, g_starts)
    npos = np.add.reduceat(ys, g_starts)
    cnt = np.diff(np.r_[g_starts, n])
    assert len(cnt) == n_users
    nneg = cnt - npos
    valid = (npos > 0) & (nneg > 0)
    auc_u = np.full(n_users, np.nan)
    auc_u[valid] = (r2 - npos * (npos + 1))[valid] / (2.0 * npos * nneg)[valid]
    return auc_u, valid


# ----------------------------------------------------------------------------- public API
def auc(labels, scores) -> float:
    """ROC AUC = (R_pos - n_pos(n_pos+1)/2) / (n_pos n_neg), average ranks for ties.

    Raises ValueError for empty/misaligned input, labels outside {0,1},
    non-finite scores, or a single class.
    """
    y, s = _labels(labels), _scores(scores)
    _check_len(y, s, "labels", "scores")
    msg = _single_class_msg(y)
    if msg:
        raise ValueError(msg)
    return float(_auc_core(y, s))


def uauc(users, labels, scores) -> UAUCResult:
    """UAUC = mean over users u having both classes of AUC_u (ranks taken within u).

    Users with a single class are skipped and counted in ``n_skipped``; raises
    ValueError if no user has both classes (or on invalid input as in :func:`auc`).
    """
    y, s = _labels(labels), _scores(scores)
    _check_len(y, s, "labels", "scores")
    uid, n_users = _id_index(users)
    _check_len(uid, y, "users", "labels")
    auc_u, valid = _uauc_core(uid, n_users, y, s)
    n_ok = int(valid.sum())
    if n_ok == 0:
        raise ValueError(f"UAUC is undefined: none of the {n_users} users has both a positive and a "
                         f"negative label ({n_users} skipped); need at least one such user.")
    return UAUCResult(uauc=float(auc_u[valid].mean()), n_users=n_ok, n_skipped=n_users - n_ok)


def _summary(uid: np.ndarray, y: np.ndarray, s: np.ndarray) -> dict:
    """AUC/UAUC of already-validated arrays; undefined metrics become None plus a "note"."""
    out = {"auc": None, "uauc": None, "n": int(len(y)), "n_users": 0, "n_users_skipped": 0}
    if len(y) == 0:
        out["note"] = "no samples in this subset; auc and uauc are undefined"
        return out
    notes = []
    msg = _single_class_msg(y)
    if msg:
        notes.append(msg)
    else:
        out["auc"] = float(_auc_core(y, s))
    uniq, inv = np.unique(uid, return_inverse=True)
    auc_u, valid = _uauc_core(inv.reshape(-1).astype(np.int64), len(uniq), y, s)
    n_ok = int(valid.sum())
    out["n_users"], out["n_users_skipped"] = n_ok, int(len(uniq) - n_ok)
    if n_ok:
        out["uauc"] = float(auc_u[valid].mean())
    else:
        notes.append(f"UAUC is undefined: none of the {len(uniq)} users has both classes")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def evaluate(labels, scores, users, cold=None) -> dict:
    """Overall AUC/UAUC, plus "warm"/"cold" sub-dicts when a ``cold`` mask is given.

    ``cold[i]`` is True when the user or item of row i was unseen in training;
    warm = ~cold.  Invalid input (misaligned, non-binary labels, NaN scores, bad
    mask) raises ValueError.  A metric that is undefined on some (sub)set
    (empty, single class, no user with both classes) is reported as None with a
    "note" explaining why; "n" is always reported.  The result is JSON-safe.
    """
    y, s = _labels(labels), _scores(scores)
    _check_len(y, s, "labels", "scores")
    uid, _ = _id_index(users)
    _check_len(uid, y, "users", "labels")
    out = _summary(uid, y, s)
    if cold is None:
        return out
    c = _as_1d(cold, "cold")
    _check_len(c, y, "cold", "labels")
    if c.dtype.kind != "b":
        if c.dtype.kind not in "iuf" or not np.isin(c, (0, 1)).all():
            raise ValueError(f"cold must be a boolean mask (True = unseen user/item), got dtype {c.dtype}.")
        c = c.astype(bool)
    out["warm"] = _summary(uid[~c], y[~c], s[~c])
    out["cold"] = _summary(uid[c], y[c], s[c])
    return out


# ----------------------------------------------------------------------------- ranking over candidate sets
def _ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    bad = [k for k in ks if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1]
    if not ks or bad:
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}; e.g. ks=(1, 5, 10).")
    return tuple(sorted({int(k) for k in ks}))


def _query_problem(q_raw, qid: np.ndarray, n_q: int, npos: np.ndarray, count: np.ndarray) -> str | None:
    bad = np.flatnonzero((npos != 1) | (count - npos < 1))
    if not len(bad):
        return None
    first = np.unique(qid, return_index=True)[1]          # first row of each query
    names = np.asarray(q_raw)[first[bad[:5]]].tolist()
    shown = ", ".join(f"{q!r} ({npos[b]} positive(s) of {count[b]} rows)" for q, b in zip(names, bad[:5]))
    return (f"{len(bad)} of {n_q} queries do not have exactly one positive and at least one negative: "
            f"{shown}{', ...' if len(bad) > 5 else ''}; a query is one positive (label 1) with its "
            f"negative candidates (label 0) under one query id.")


def _tie_ranks(qid: np.ndarray, n_q: int, y: np.ndarray, s: np.ndarray):
    """Per query: (g, t) = negatives scored above / equal to the positive (validated input)."""
    pos_score = np.empty(n_q)
    pos_score[qid[y == 1]] = s[y == 1]
    neg = y == 0
    ps = pos_score[qid]
    g = np.bincount(qid[neg & (s > ps)], minlength=n_q)
    t = np.bincount(qid[neg & (s == ps)], minlength=n_q)
    return g, t


def ranking(queries, labels, scores, ks=(1, 5, 10), users=None) -> dict:
    """Recall@K, NDCG@K and MRR of one positive among its candidates, averaged over queries.

    A query is the rows sharing a query id: exactly one positive (label 1) and >= 1 negatives
    (label 0), e.g. a test positive and N sampled negatives (``cora prepare --rank-negatives N``),
    or all items.  With g negatives scored strictly higher than the positive and t tied with it, the
    positive's rank r (1-based, best first) is uniform on {g+1, ..., g+t+1} under uniformly random
    tie-breaking; each metric is its exact expectation over that, with m = t + 1:

        Recall@K = P(r <= K)                    = clip(K - g, 0, m) / m     (= HitRate@K: one positive)
        NDCG@K   = E[1{r <= K} / log2(r + 1)]   = (D(min(g+m, K)) - D(min(g, K))) / m
        MRR      = E[1 / r]                     = (H(g+m) - H(g)) / m

    where D(n) = sum_{r=1..n} 1/log2(r+1) and H(n) = sum_{r=1..n} 1/r (ideal DCG is 1 with one
    positive, so NDCG = DCG).  Without ties this is the usual value; a constant scorer gets the
    value of a random order instead of an optimistic or pessimistic one.

    Returns "recall@K", "ndcg@K" for each K, "mrr" (means over queries), "n_queries" and
    "n_candidates" (mean rows per query, the positive included).  With ``users`` (one id per row,
    equal within a query) also "user_recall@K", "user_ndcg@K", "user_mrr" (mean over each user's
    queries, then over users) and "n_users".  Raises ValueError for misaligned input, labels
    outside {0,1}, non-finite scores, bad ``ks``, a query with other than one positive or with no
    negative (naming the first few), or a query spanning several users.  The result is JSON-safe.
    """
    y, s = _labels(labels), _scores(scores)
    _check_len(y, s, "labels", "scores")
    qid, n_q = _id_index(queries, "queries", "query")
    _check_len(qid, y, "queries", "labels")
    ks = _ks(ks)
    count = np.bincount(qid, minlength=n_q)
    npos = np.bincount(qid, weights=y, minlength=n_q).astype(np.int64)
    msg = _query_problem(queries, qid, n_q, npos, count)
    if msg:
        raise ValueError(msg)
    g, t = _tie_ranks(qid, n_q, y, s)
    m = t + 1
    n_max = int(count.max())
    r = np.arange(1, n_max + 1)
    harmonic = np.r_[0.0, np.cumsum(1.0 / r)]                   # H(0..n_max)
    dcg = np.r_[0.0, np.cumsum(1.0 / np.log2(r + 1))]            # D(0..n_max)
    per_query = {f"recall@{k}": np.clip(k - g, 0, m) / m for k in ks}
    per_query.update({f"ndcg@{k}": (dcg[np.minimum(g + m, k)] - dcg[np.minimum(g, k)]) / m for k in ks})
    per_query["mrr"] = (harmonic[g + m] - harmonic[g]) / m
    out = {name: float(v.mean()) for name, v in per_query.items()}
    out.update(n_queries=n_q, n_candidates=float(count.mean()))
    if users is None:
        return out
    uid, _ = _id_index(users)
    _check_len(uid, y, "users", "labels")
    q_user = np.empty(n_q, dtype=np.int64)
    q_user[qid] = uid
    split = np.flatnonzero(q_user[qid] != uid)
    if len(split):
        first, n_bad = np.asarray(queries)[split[0]].tolist(), len(np.unique(qid[split]))
        raise ValueError(f"query {first!r} spans several users ({n_bad} such queries); a query is one user's "
                         f"candidates: give each user's queries their own ids.")
    uniq, q_user = np.unique(q_user, return_inverse=True)        # users that have queries, 0..U-1
    n_per_user = np.bincount(q_user)
    for name, v in per_query.items():
        out[f"user_{name}"] = float((np.bincount(q_user, weights=v) / n_per_user).mean())
    out["n_users"] = len(uniq)
    return out


# ----------------------------------------------------------------------------- paired differences
def paired_bootstrap(users, labels, scores_a, scores_b, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """How sure is "a scores better than b on these rows"? A paired bootstrap that resamples *users* (with
    replacement, all rows of a drawn user together: a user's rows are not independent) and recomputes
    AUC(a) - AUC(b) and UAUC(a) - UAUC(b) on each resample.

    Returns {"n", "users", "reps", "level", "auc": {...}, "uauc": {...}}, each metric as {"diff": the
    difference on the rows as given, "low"/"high": the percentile interval at ``level``, "p_not_above": the
    share of resamples where a is not above b}; a metric is None when undefined on the rows given (one
    class; no user with both classes). Resamples where it is undefined are left out and counted in
    "dropped". Deterministic for a given seed."""
    y, a, b = _labels(labels), _scores(scores_a), _scores(scores_b)
    _check_len(y, a, "labels", "scores_a")
    _check_len(y, b, "labels", "scores_b")
    uid, n_users = _id_index(users)
    _check_len(uid, y, "users", "labels")
    if reps < 1 or not 0 < level < 1:
        raise ValueError(f"reps must be >= 1 and level in (0, 1), got reps={reps}, level={level}")
    auc_a, ok = _uauc_core(uid, n_users, y, a)            # per-user AUCs do not change under user resampling
    auc_b, _ = _uauc_core(uid, n_users, y, b)
    per_user = np.where(ok, auc_a - auc_b, 0.0)
    sorted_a, sorted_b = _by_score(y, a), _by_score(y, b)
    rng = np.random.default_rng(seed)
    draws = {"auc": [], "uauc": []}
    dropped = {"auc": 0, "uauc": 0}
    for _ in range(reps):
        count = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)     # times each user is drawn
        w = count[uid].astype(np.float64)                                             # a drawn user's rows, repeated
        pos = (w * y).sum()
        if 0 < pos < w.sum():
            draws["auc"].append(_weighted_auc(*sorted_a, w) - _weighted_auc(*sorted_b, w))
        else:
            dropped["auc"] += 1
        weight = count * ok
        if weight.sum():
            draws["uauc"].append(float((weight * per_user).sum() / weight.sum()))
        else:
            dropped["uauc"] += 1
    full = {"auc": None if _single_class_msg(y) else _auc_core(y, a) - _auc_core(y, b),
            "uauc": float(per_user[ok].mean()) if ok.any() else None}
    out = {"n": int(len(y)), "users": int(n_users), "reps": reps, "level": level}
    tail = 100 * (1 - level) / 2
    for key, values in draws.items():
        if full[key] is None or not values:
            out[key] = None
            continue
        v = np.asarray(values)
        low, high = np.percentile(v, [tail, 100 - tail])
        out[key] = {"diff": float(full[key]), "low": float(low), "high": float(high),
                    "p_not_above": float(np.mean(v <= 0)), "dropped": dropped[key]}
    return out


def _by_score(y: np.ndarray, s: np.ndarray) -> tuple:
    """(row order by score, its labels, the start of each run of tied scores): sorted once for
    ``_weighted_auc``."""
    order = np.argsort(s, kind="stable")
    ss = s[order]
    return order, y[order], np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])


def _weighted_auc(order: np.ndarray, ys: np.ndarray, starts: np.ndarray, w: np.ndarray) -> float:
    """AUC with integer row weights w (a row of weight k counts as k copies; ties count one half), from
    ``_by_score``'s arrays: the AUC of the rows repeated, without repeating or sorting them again."""
    ws = w[order]
    pos = np.add.reduceat(ws * ys, starts)                  # per tie run: positive and negative weight
    neg = np.add.reduceat(ws * (1 - ys), starts)
    below = np.cumsum(neg) - neg                            # negatives scored strictly lower
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
