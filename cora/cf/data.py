"""A prepared data directory (cora.data.schema) as the in-memory tensors the CF models train on.

Each split becomes a :class:`Split` of aligned tensors. The ``history`` list column becomes an
int64 ``(N, L)`` array of each row's last L earlier positive items, most recent last, left-padded
with ``HISTORY_PAD`` (-1); the conversion works on the Arrow offsets, with no per-row Python.
Every id is checked against ``num_users`` / ``num_items`` of dataset.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cora.cf.models import HISTORY_PAD
from cora.data.schema import INTERACTIONS, SPLITS, DatasetError, read_manifest

_COLUMNS = ("user", "item", "label", "timestamp", "cold_user", "cold_item")


@dataclass
class Split:
    """One split as aligned tensors of N rows."""

    users: torch.Tensor
    """(N,) int64 dense user ids."""
    items: torch.Tensor
    """(N,) int64 dense item ids."""
    labels: torch.Tensor
    """(N,) float32 labels in {0, 1}."""
    timestamps: torch.Tensor
    """(N,) int64 unix seconds."""
    cold: torch.Tensor
    """(N,) bool: user or item unseen in train (cold_user | cold_item)."""
    history: torch.Tensor | None = None
    """(N, L) int64 earlier positive items, left-padded with HISTORY_PAD; None if not loaded."""

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> "Split":
        """The rows at ``index`` (a (k,) int64 or (N,) bool tensor)."""
        h = None if self.history is None else self.history[index]
        return Split(self.users[index], self.items[index], self.labels[index],
                     self.timestamps[index], self.cold[index], h)


@dataclass
class CFData:
    """The three splits and the id ranges they live in."""

    num_users: int
    """Users have dense ids 0..num_users-1."""
    num_items: int
    """Items have dense ids 0..num_items-1."""
    train: Split
    """Fitted on."""
    valid: Split
    """Early stopping and model selection (valid AUC)."""
    test: Split
    """Reported only."""


def pad_histories(lists: pa.Array | pa.ChunkedArray, max_len: int) -> np.ndarray:
    """list<int> column (N rows) -> (N, max_len) int64: the last max_len values of each row,
    right-aligned and left-padded with HISTORY_PAD. Null lists count as empty."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks else pa.array([], lists.type)
    n = len(lists)
    lens = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)   # (sum lens,)
    ends = np.cumsum(lens)                                         # (N,) end offset of each row
    keep = np.minimum(lens, max_len)                               # (N,) values kept per row
    row = np.repeat(np.arange(n), keep)                            # (K,) row of each kept value
    # position within the kept tail, 0..keep-1, then its source index and target column
    within = np.arange(len(row)) - np.repeat(np.cumsum(keep) - keep, keep)
    src = np.repeat(ends - keep, keep) + within
    col = max_len - np.repeat(keep, keep) + within
    out = np.full((n, max_len), HISTORY_PAD, dtype=np.int64)
    out[row, col] = values[src]
    return out


def _check_range(values: np.ndarray, n: int, what: str, where: str) -> None:
    bad = (values < 0) | (values >= n)
    if bad.any():
        first = int(values[bad][0])
        raise DatasetError(f"{where}: {what} id {first} is outside 0..{n - 1} ({int(bad.sum())} values out of "
                           f"range; dataset.json says num_{what}s={n}); the split and dataset.json "
                           f"disagree: prepare the data again")


def _column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if col.null_count and name in ("user", "item", "label", "timestamp"):
        raise DatasetError(f"{path}: column {name!r} has {col.null_count} null values; every row needs one")
    if name in ("cold_user", "cold_item"):
        col = pc.fill_null(col, False)
    return col.to_numpy()


def read_split(path: str | Path, num_users: int, num_items: int, max_history: int | None) -> Split:
    """One INTERACTIONS parquet file as a Split; ``max_history=None`` skips the history column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing; a prepared data directory has {', '.join(SPLITS)}.parquet")
    names = list(_COLUMNS) + (["history"] if max_history else [])
    missing = [c for c in names if c not in pq.read_schema(path).names]
    if missing:
        raise DatasetError(f"{path} lacks column(s) {missing}; expected the INTERACTIONS schema "
                           f"({', '.join(INTERACTIONS.names)})")
    table = pq.read_table(path, columns=names)
    cols = {c: _column(table, c, path) for c in _COLUMNS}
    _check_range(cols["user"], num_users, "user", str(path))
    _check_range(cols["item"], num_items, "item", str(path))
    labels = cols["label"]
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise DatasetError(f"{path}: label {labels[bad][0]!r} is not 0 or 1 ({int(bad.sum())} such rows); "
                           f"labels must be binary")
    history = None
    if max_history:
        flat = pc.list_flatten(table.column("history")).to_numpy(zero_copy_only=False)
        _check_range(flat, num_items, "item", f"{path} (history column)")
        history = torch.from_numpy(pad_histories(table.column("history"), max_history))  # (N, L)
    return Split(users=torch.from_numpy(cols["user"].astype(np.int64)),
                 items=torch.from_numpy(cols["item"].astype(np.int64)),
                 labels=torch.from_numpy(labels.astype(np.float32)),
                 timestamps=torch.from_numpy(cols["timestamp"].astype(np.int64)),
                 cold=torch.from_numpy(cols["cold_user"] | cols["cold_item"]),
                 history=history)


def _count(manifest: dict, key: str, data_dir: Path) -> int:
    n = manifest.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DatasetError(f"{data_dir / 'dataset.json'}: {key} must be a positive integer, got {n!r}; "
                           f"prepare the data again")
    return n


def load_data(data_dir: str | Path, max_history: int | None = None) -> tuple[CFData, dict]:
    """(CFData, the dataset.json manifest) of a prepared directory; histories only if max_history."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    nu, ni = _count(manifest, "num_users", data_dir), _count(manifest, "num_items", data_dir)
    splits = {s: read_split(data_dir / f"{s}.parquet", nu, ni, max_history) for s in SPLITS}
    return CFData(nu, ni, **splits), manifest
