"""CoLLM's data protocol, applied to a raw interaction frame: label rule, de-duplication, time split,
dense ids, histories of earlier positives, warm/cold flags.

Label rules: ``rating>=4`` (MovieLens), ``rating==5`` (Amazon-Book), any ``rating OP NUMBER`` with OP
in >=, >, ==, <=, <; or ``label`` (the input already holds 0/1 labels).

Split rules (``--split``):

    months:A-B,C-D,E-F   calendar months counted from the first month present in the data (month 0);
                         train = months A..B, valid = C..D, test = E..F (inclusive); rows in no range
                         are dropped as outside_time_window. ML-1M (CoLLM): months:14-23,24-28,29-33.
    time:F1,F2,F3        the rows in time order, cut at the timestamps that put fractions F1/F2/F3 of
                         them in train/valid/test (rows sharing a boundary timestamp stay together).
    given                the input's own split (CoLLM files).

History of a sample: the user's positive items strictly earlier in (timestamp, input order), across
all splits (a test sample may list positives from the valid period: they happened before it), most
recent last, at most ``history_stored`` kept. The input's own lists are kept for ``collm``. A frame
with a "domain" column (a multi-domain input, see domains.py) keeps it, and a history holds the
earlier positives of the user in the sample's own domain only (its prompt names that domain's items).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .accounting import Accounting
from .schema import SPLITS, DatasetError

_RULE = re.compile(r"^\s*rating\s*(>=|>|==|<=|<)\s*(-?[0-9.]+)\s*$")
_OPS = {">=": np.greater_equal, ">": np.greater, "==": np.equal, "<=": np.less_equal, "<": np.less}


def apply_label_rule(f: pd.DataFrame, rule: str) -> np.ndarray:
    """0/1 labels (int8) under ``rule``."""
    if rule.strip() == "label":
        if f["label"].isna().any():
            raise DatasetError("label rule 'label' but the input has no label column; use a rating rule "
                               "such as rating>=4")
        return f["label"].to_numpy().astype(np.int8)
    m = _RULE.match(rule)
    if not m:
        raise DatasetError(f"label rule {rule!r} not understood; use e.g. 'rating>=4', 'rating==5' or "
                           f"'label'")
    if f["rating"].isna().all():
        raise DatasetError(f"label rule {rule!r} needs ratings, but the input has none; use --label-rule label")
    return _OPS[m.group(1)](f["rating"].to_numpy(), float(m.group(2))).astype(np.int8)


def month_index(ts: np.ndarray) -> np.ndarray:
    """Calendar month of each unix time, counted from the first month present (UTC)."""
    months = ts.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)
    return months - months.min()


def assign_split(f: pd.DataFrame, spec: str, acc: Accounting) -> tuple[np.ndarray, dict]:
    """Split name per row (None = outside every range; counted) and the boundaries for dataset.json."""
    kind, _, args = spec.partition(":")
    ts = f["timestamp"].to_numpy()
    out = np.full(len(f), None, dtype=object)
    if kind == "given":
        return f["split"].to_numpy(dtype=object), {"rule": "given"}
    if kind == "months":
        ranges = _ranges(spec, args)
        month = month_index(ts)
        first = ts.astype("datetime64[s]").astype("datetime64[M]").min()
        bounds = {"rule": spec, "month_0": str(first)}
        for split, (a, b) in zip(SPLITS, ranges):
            out[(month >= a) & (month <= b)] = split
            bounds[split] = {"months": [a, b], "from": str(first + np.timedelta64(a, "M")),
                             "to_before": str(first + np.timedelta64(b + 1, "M"))}
    elif kind == "time":
        fracs = _fractions(spec, args)
        order = np.sort(ts)
        cuts = [order[min(len(ts) - 1, int(round(sum(fracs[:k + 1]) * len(ts))) - 1)] if len(ts) else 0
                for k in range(2)]
        out[:] = "test"
        out[ts <= cuts[1]] = "valid"
        out[ts <= cuts[0]] = "train"
        bounds = {"rule": spec, "train_last_timestamp": int(cuts[0]), "valid_last_timestamp": int(cuts[1])}
    else:
        raise DatasetError(f"split rule {spec!r} not understood; use months:A-B,C-D,E-F, time:F1,F2,F3 "
                           f"or given")
    outside = np.array([s is None for s in out])
    describe = lambda i: f"timestamp {int(ts[i])} (month {int(month_index(ts)[i])}) under {spec}"  # noqa: E731
    acc.drop_mask("outside_time_window", outside, describe)
    return out, bounds


def _ranges(spec: str, args: str) -> list[tuple[int, int]]:
    try:
        ranges = [tuple(int(x) for x in part.split("-")) for part in args.split(",")]
    except ValueError:
        ranges = []
    if len(ranges) != 3 or any(len(r) != 2 or r[0] > r[1] or r[0] < 0 for r in ranges):
        raise DatasetError(f"split rule {spec!r}: expected three month ranges A-B,C-D,E-F with A <= B")
    return ranges


def _fractions(spec: str, args: str) -> list[float]:
    try:
        fracs = [float(x) for x in args.split(",")]
    except ValueError:
        fracs = []
    if len(fracs) != 3 or min(fracs) <= 0 or abs(sum(fracs) - 1) > 1e-6:
        raise DatasetError(f"split rule {spec!r}: expected three positive fractions summing to 1")
    return fracs


@dataclass
class Prepared:
    frame: pd.DataFrame          # INTERACTIONS columns + split, sorted by sample_id
    users: pd.DataFrame          # user, raw_id
    items: pd.DataFrame          # item, raw_id, title
    boundaries: dict


def drop_duplicates(f: pd.DataFrame, acc: Accounting) -> pd.DataFrame:
    dup = f.duplicated(["user", "item", "timestamp"], keep="first").to_numpy()
    keep = acc.drop_mask("duplicate", dup, lambda i: f"user {f['user'].iloc[i]!r} item "
                         f"{f['item'].iloc[i]!r} at {f['timestamp'].iloc[i]}")
    return f[keep]


def dense_ids(raw: pd.Series, keep_ids: bool) -> tuple[np.ndarray, np.ndarray]:
    """(dense id per row, raw id per dense id): first-appearance order, or the input's own ints."""
    if keep_ids:
        ids = pd.to_numeric(raw, errors="coerce")
        if ids.isna().any() or (ids < 0).any():
            raise DatasetError(f"ids must be non-negative integers to be kept as they are; got "
                               f"{raw[ids.isna() | (ids < 0)].iloc[0]!r}")
        ids = ids.to_numpy(np.int64)
        return ids, np.array([str(i) for i in range(ids.max() + 1)], dtype=object)
    codes, uniques = pd.factorize(raw, sort=False)
    return codes.astype(np.int64), uniques.to_numpy(dtype=object)


def histories(user: np.ndarray, item: np.ndarray, label: np.ndarray, keep: int) -> list[np.ndarray]:
    """For rows in time order: each row's user's earlier positive items (most recent last, <= keep)."""
    n = len(user)
    by_user = np.lexsort((np.arange(n), user))             # stable: time order within a user
    u, pos = user[by_user], label[by_user].astype(np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    first_of_user = np.repeat(starts, np.diff(np.r_[starts, n]))
    cum = np.cumsum(pos) - pos                              # positives before each row (global)
    before = cum - cum[first_of_user]                       # ... within its user
    pos_items = item[by_user][pos.astype(bool)]             # all positives, grouped by user, time order
    pos_start = cum[first_of_user]                          # where this user's positives begin
    length = np.minimum(before, keep)
    begin = pos_start + before - length
    offsets = np.r_[0, np.cumsum(length)]
    flat = pos_items[np.repeat(begin - offsets[:-1], length) + np.arange(offsets[-1])]
    hist_sorted = np.split(flat.astype(np.int32), offsets[1:-1])
    out: list[np.ndarray] = [None] * n
    for k, row in enumerate(by_user):
        out[row] = hist_sorted[k]
    return out


def apply(raw, acc: Accounting, label_rule: str, split: str, history_stored: int) -> Prepared:
    f = raw.frame
    f = f.assign(label=apply_label_rule(f, label_rule))
    f = drop_duplicates(f, acc)
    names, bounds = assign_split(f, split, acc)
    f = f.assign(split=names)[names != None]  # noqa: E711
    f = f.sort_values(["timestamp", "order"], kind="stable").reset_index(drop=True)
    keep_ids = raw.defaults.get("variant") == "collm"
    user, user_raw = dense_ids(f["user"], keep_ids)
    if keep_ids:
        hist_raw = pd.Series([i for h in f["history"] for i in h], dtype=object)
        all_items = pd.concat([f["item"], hist_raw], ignore_index=True)
        item_all, item_raw = dense_ids(all_items, True)
        item = item_all[:len(f)]
        lens = f["history"].map(len).to_numpy()
        hist = np.split(item_all[len(f):].astype(np.int32), np.cumsum(lens)[:-1])
        hist = [h[-history_stored:] if history_stored else h[:0] for h in hist]
    else:
        item, item_raw = dense_ids(f["item"], False)
        group = user
        if "domain" in f:                 # histories per (user, domain): the key user * D + domain code
            code, names = pd.factorize(f["domain"], sort=True)
            group = user * len(names) + code
        hist = histories(group, item, f["label"].to_numpy(), history_stored)
    for split in SPLITS:
        if not (f["split"] == split).any():
            raise DatasetError(f"split {split!r} is empty after filtering (split rule {split!r}: "
                               f"{bounds}); widen the rule with --split, or check the timestamps")
    train = (f["split"] == "train").to_numpy()
    out = pd.DataFrame({
        "sample_id": np.arange(len(f), dtype=np.int64), "user": user.astype(np.int32),
        "item": item.astype(np.int32), "label": f["label"].to_numpy(np.int8),
        "rating": f["rating"].to_numpy(np.float32), "timestamp": f["timestamp"].to_numpy(np.int64),
        "history": hist,
        "cold_user": ~np.isin(user, user[train]), "cold_item": ~np.isin(item, item[train]),
        "split": f["split"].to_numpy()})
    if "domain" in f:
        out["domain"] = f["domain"].to_numpy(dtype=object)
    titles = raw.titles
    items = pd.DataFrame({"item": np.arange(len(item_raw), dtype=np.int32), "raw_id": item_raw.astype(str),
                          "title": [titles.get(r, f"item {r}") for r in item_raw]})
    users = pd.DataFrame({"user": np.arange(len(user_raw), dtype=np.int32), "raw_id": user_raw.astype(str)})
    return Prepared(out, users, items, bounds)
