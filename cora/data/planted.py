"""The label rules of synthetic data (``cora prepare --source synthetic --rule ...``): how a planted
score s turns a (user, item) interaction into a label, 1[s + noise * eps > 0], eps ~ N(0, 1).

Static rules (the score depends on the user's and the item's fixed factors u, v only):

    dot          s = u . v / sqrt(F)                                  (the MF view)
    additive     s = (u . w_u + v . w_v) / sqrt(2 F)                  (propensities along fixed w_u, w_v)

Sequential rule (what a user likes next depends on what they liked recently):

    sequential   s_t = v_t . m_t / |m_t|,   m_t = mean(v of the user's last W positives before t)
                                             or u while the user has no positive yet

Each user's interactions are replayed in time order (timestamp, then input order: the order the
protocol uses for histories), and an interaction's label (noise included) decides whether its item
joins the positives that make up the next ones' taste m. s is the item factor's projection on the
direction of the recent taste (|v| times the cosine; std 1 like the static rules' scores). The
taste drifts: the mean of W items of one half-space keeps about 0.4 of the old direction for F = 16
and W = 5, so a user's labels over time are poorly explained by any fixed user vector, and well by
the factors of the items in the history (the last W of a sample's stored history, see protocol.py).
"""

from __future__ import annotations

import numpy as np

RULES = ("dot", "additive", "sequential")


def static_score(rule: str, uf: np.ndarray, vf: np.ndarray, user: np.ndarray, item: np.ndarray,
                 seed: int) -> np.ndarray:
    """s of a static rule for rows (user, item); 'additive' draws w_u, w_v from default_rng(seed + 1)."""
    if rule == "dot":
        return (uf[user] * vf[item]).sum(1) / np.sqrt(uf.shape[1])
    wu, wv = np.random.default_rng(seed + 1).standard_normal((2, uf.shape[1]))
    return (uf[user] @ wu + vf[item] @ wv) / np.sqrt(2 * uf.shape[1])


def sequential_score(uf: np.ndarray, vf: np.ndarray, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
                     noise: np.ndarray, window: int) -> np.ndarray:
    """s_t + noise of the sequential rule for rows (user, item, ts), ``noise`` per row (already scaled);
    ties in ts are broken by row order. Label = result > 0.

    All users advance together: step j handles every user's j-th interaction (in time order), so the
    loop runs as many times as the busiest user has interactions."""
    n, f = len(user), uf.shape[1]
    by_user = np.lexsort((np.arange(n), ts, user))           # (n,) rows grouped by user, in time order
    starts = np.r_[0, np.flatnonzero(np.diff(user[by_user])) + 1]
    step = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))   # j of each row of by_user
    recent = np.zeros((len(uf), window, f))                 # (U, W, F) ring of the last positives' factors
    positives = np.zeros(len(uf), dtype=np.int64)          # positives so far, per user
    out = np.empty(n)
    for j in range(int(step.max(initial=-1)) + 1):
        rows = by_user[step == j]                           # one row per user with a j-th interaction
        u = user[rows]
        held = np.minimum(positives[u], window)
        taste = np.where(held[:, None] > 0, recent[u].sum(1) / np.maximum(held, 1)[:, None], uf[u])  # (r, F)
        taste /= np.linalg.norm(taste, axis=1, keepdims=True)
        out[rows] = (vf[item[rows]] * taste).sum(1) + noise[rows]
        liked = out[rows] > 0
        recent[u[liked], positives[u[liked]] % window] = vf[item[rows[liked]]]
        positives[u[liked]] += 1
    return out


def labels(rule: str, uf: np.ndarray, vf: np.ndarray, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
           eps: np.ndarray, noise: float, seed: int, window: int) -> np.ndarray:
    """0/1 labels (float) of rows (user, item, ts) under ``rule``; eps: the rows' N(0, 1) noise draws."""
    if rule == "sequential":
        score = sequential_score(uf, vf, user, item, ts, noise * eps, window)
    else:
        score = static_score(rule, uf, vf, user, item, seed) + noise * eps
    return (score > 0).astype(float)
