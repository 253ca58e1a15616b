"""The ``rank`` split (``cora prepare --rank-negatives N``): every positive test sample with N sampled
negatives, drawn once, seeded and recorded, so that ranking metrics (``cora.metrics.ranking``) are
computed over the same candidates by every model and every run.

Query q is the test positive with ``sample_id`` q. Its candidates are that row (label 1) and N rows
that copy its user, timestamp, history and cold_user, with label 0, no rating, and an item drawn
uniformly without replacement from the items the user has no interaction with: no row of the user in
any split, and in no history of the user's test positives (for ``collm`` input, whose history lists
may name items without a row; otherwise histories are earlier rows). ``cold_item`` is recomputed for
the drawn item (no train interaction). The draw for query q uses ``numpy.random.default_rng([seed, q])``, so it depends on the
seed and the query only. A query whose user has fewer than N items left to draw from is not written and
is counted under ``skipped.too_few_items``: every written query has exactly N + 1 candidates.

Rows are grouped by query (in test order), the positive first; their ``sample_id`` continues after
the last id of train/valid/test, so sample ids stay unique across all splits; ``query`` holds q.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import DatasetError


def _interacted(frame: pd.DataFrame, queries: pd.DataFrame, n_items: int) -> np.ndarray:
    """Sorted unique codes user * n_items + item of every (user, item) to exclude."""
    users = frame["user"].to_numpy(np.int64)
    hist_len = queries["history"].map(len).to_numpy()
    hist_users = np.repeat(queries["user"].to_numpy(np.int64), hist_len)
    hist_items = np.concatenate([np.asarray(h, np.int64) for h in queries["history"]] + [np.zeros(0, np.int64)])
    codes = np.r_[users * n_items + frame["item"].to_numpy(np.int64), hist_users * n_items + hist_items]
    return np.unique(codes)


def draw(taken: np.ndarray, n_items: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct items of 0..n_items-1 outside the sorted unique ``taken``, uniformly.

    Draws n distinct positions k among the n_items - len(taken) free items; the k-th free item is
    k + #{j: taken[j] - j <= k} (taken[j] - j counts the free items below taken[j])."""
    k = rng.choice(n_items - len(taken), n, replace=False)
    return k + np.searchsorted(taken - np.arange(len(taken)), k, side="right")


def rank_split(frame: pd.DataFrame, n_items: int, negatives: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """(the rank split: INTERACTIONS columns + split + query, its dataset.json record); see the module doc."""
    test = frame[(frame["split"] == "test") & (frame["label"] == 1)]
    codes = _interacted(frame, test, n_items)
    code_user = codes // n_items
    keep, drawn = [], []
    for pos, (q, u) in enumerate(zip(test["sample_id"].to_numpy(), test["user"].to_numpy(np.int64))):
        taken = codes[np.searchsorted(code_user, u):np.searchsorted(code_user, u, side="right")] - u * n_items
        if n_items - len(taken) < negatives:
            continue
        keep.append(pos)
        drawn.append(draw(taken, n_items, negatives, np.random.default_rng([seed, int(q)])))
    skipped = len(test) - len(keep)
    if not keep:
        raise DatasetError(f"--rank-negatives {negatives}: none of the {len(test)} test positives has a user "
                           f"with {negatives} items left to draw from ({n_items} items in all); lower "
                           f"--rank-negatives")
    rows = test.iloc[np.repeat(keep, negatives + 1)].reset_index(drop=True)   # (Q * (N+1)) copies
    neg = np.arange(len(rows)) % (negatives + 1) > 0                           # all but each query's first
    train_items = frame.loc[frame["split"] == "train", "item"].unique()
    items = rows["item"].to_numpy().copy()
    items[neg] = np.concatenate(drawn)
    rows = rows.assign(
        query=rows["sample_id"].to_numpy(np.int64),
        sample_id=int(frame["sample_id"].max()) + 1 + np.arange(len(rows), dtype=np.int64),
        item=items.astype(np.int32), label=np.where(neg, 0, 1).astype(np.int8),
        rating=np.where(neg, np.nan, rows["rating"].to_numpy()).astype(np.float32),
        cold_item=~np.isin(items, train_items), split="rank")
    record = {"negatives": negatives, "seed": seed, "queries": len(keep),
              "skipped": {"too_few_items": skipped}}
    return rows, record
