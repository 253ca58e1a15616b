"""Planted synthetic recommendation data: labels drawn from latent user and item factors.

    u_user, v_item ~ N(0, I_dim);  label = 1[ s(u, v) + noise * eps > 0 ],  eps ~ N(0, 1)
    rule "dot":      s = u.v / sqrt(dim)                       (the MF view)
    rule "additive": s = (u.w_u + v.w_v) / sqrt(2 dim)         (user and item propensities)

Titles are made from a word list. With ``history="random"`` the history titles are random too, so
the text carries no information about the label (only the CF embeddings do): the setting in which an
LLM can beat chance only by perceiving collaborative information. ``history="positive"`` lists the
user's earlier positive items, as real data does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

WORDS = ("amber river night garden iron summer silent glass harbor winter crimson echo forest golden "
         "hidden lantern midnight ocean paper quiet shadow stone storm velvet wild blue broken city "
         "dream fire ghost heart island journey king last lost moon road secret star sun time world").split()


@dataclass
class PlantedData:
    users: np.ndarray            # (N,) int user id per sample
    items: np.ndarray            # (N,) int item id per sample
    labels: np.ndarray           # (N,) float {0, 1}
    user_factors: np.ndarray     # (n_users, dim) the planted factors (stand-in for CF embeddings)
    item_factors: np.ndarray     # (n_items, dim)
    titles: list[str]            # item id -> title
    histories: list[list[str]]   # per sample, oldest first
    targets: list[str]           # per sample, the target title


def planted(n_users: int = 64, n_items: int = 128, n_samples: int = 512, dim: int = 8, noise: float = 0.0,
            history: Literal["random", "positive"] = "random", history_len: int = 3,
            text_pool: int | None = None, rule: Literal["dot", "additive"] = "dot",
            seed: int = 0) -> PlantedData:
    """Planted samples; ``text_pool=K`` (with history="random") draws every prompt's history and
    target from K fixed texts, each given the same share of positives, so that text alone cannot
    separate the labels nor identify single samples."""
    if min(n_users, n_items, n_samples, dim) < 1:
        raise ValueError(f"sizes must be >= 1, got users={n_users} items={n_items} "
                         f"samples={n_samples} dim={dim}")
    rng = np.random.default_rng(seed)
    uf = rng.standard_normal((n_users, dim)).astype(np.float32)
    vf = rng.standard_normal((n_items, dim)).astype(np.float32)
    titles = [" ".join(rng.choice(WORDS, 2)).title() + f" ({1950 + i % 70})" for i in range(n_items)]
    users = rng.integers(0, n_users, n_samples)
    items = rng.integers(0, n_items, n_samples)
    if rule == "dot":      # the MF view: preference = u . v
        score = (uf[users] * vf[items]).sum(1) / np.sqrt(dim)
    elif rule == "additive":  # user and item propensities along fixed directions of the factors
        wu, wv = rng.standard_normal(dim), rng.standard_normal(dim)
        score = (uf[users] @ wu + vf[items] @ wv) / np.sqrt(2 * dim)
    else:
        raise ValueError(f"unknown rule {rule!r}; use 'dot' or 'additive'")
    score = score + noise * rng.standard_normal(n_samples)
    labels = (score > 0).astype(np.float32)
    histories, seen_pos = [], {}
    for u, i, y in zip(users, items, labels):
        if history == "random":
            histories.append([titles[j] for j in rng.integers(0, n_items, history_len)])
        else:
            histories.append(list(seen_pos.get(u, []))[-history_len:])
            if y:
                seen_pos.setdefault(u, []).append(titles[i])
    targets = [titles[i] if history == "positive" else titles[j]
               for i, j in zip(items, rng.integers(0, n_items, n_samples))]
    if text_pool:
        if history != "random":
            raise ValueError("text_pool needs history='random' (positive histories carry signal)")
        slot = np.empty(n_samples, dtype=int)
        for cls in (0.0, 1.0):  # round-robin within each class: every text gets an equal share
            idx = np.flatnonzero(labels == cls)
            slot[idx] = np.arange(len(idx)) % text_pool
        histories = [histories[k] for k in slot]
        targets = [targets[k] for k in slot]
    return PlantedData(users, items, labels, uf, vf, titles, histories, targets)
