"""Row accounting: every input row is either kept or dropped with a named reason, and counted.

``on_bad="drop"`` counts a bad row under its reason and goes on; ``on_bad="error"`` stops at the first
one with the file, line and value. At the end ``check`` proves ``input_rows == kept + sum(dropped)``.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np

from .schema import DatasetError

# Why a row can be dropped, in the order the pipeline applies the rules (documented in the README).
REASONS = {
    "malformed_row": "wrong number of fields, or a required field empty",
    "non_numeric_rating": "the rating (or label) is not a number",
    "bad_label": "the label is not 0/1 (sources that carry labels)",
    "unparsable_timestamp": "the timestamp cannot be read as a time",
    "unresolved_user": "the user id is not in the user file",
    "unresolved_item": "the item id is not in the item file",
    "duplicate": "same user, item and timestamp as an earlier row",
    "outside_time_window": "the time is outside every split of the split rule",
    # multi-domain preparation only (--target-domain; see domains.py): not bad rows, so never an error
    "target_item_overlap": "a source-domain row whose item id is also an item of the target domain",
    "other_directory": "the row's domain belongs to the other directory (OUT/source or OUT/target)",
}


class Accounting:
    def __init__(self, on_bad: Literal["drop", "error"] = "drop"):
        if on_bad not in ("drop", "error"):
            raise DatasetError(f"on_bad must be 'drop' or 'error', got {on_bad!r}")
        self.on_bad = on_bad
        self.input_rows = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def read(self, n: int) -> None:
        """n rows were read from the input."""
        self.input_rows += n

    def drop(self, reason: str, count: int = 1, example: str = "") -> None:
        """Drop ``count`` rows for ``reason`` (or raise, when on_bad='error')."""
        if reason not in REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        if count <= 0:
            return
        if self.on_bad == "error":
            raise DatasetError(f"{reason} ({REASONS[reason]}): {example}; pass --on-bad-row drop to "
                               f"drop and count such rows instead")
        self.dropped[reason] += count
        self.examples.setdefault(reason, example)

    def exclude(self, reason: str, count: int, example: str = "") -> None:
        """Set aside ``count`` rows that are not bad (a multi-domain rule): counted like a drop, but
        never an error under on_bad='error'."""
        if reason not in REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        if count > 0:
            self.dropped[reason] += count
            self.examples.setdefault(reason, example)

    def drop_mask(self, reason: str, bad: np.ndarray, describe) -> np.ndarray:
        """Drop the rows where ``bad`` is true; ``describe(i)`` names row i. Returns the keep mask."""
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            self.drop(reason, int(bad.sum()), describe(int(np.flatnonzero(bad)[0])))
        return ~bad

    def check(self, kept: int) -> dict:
        """The accounting block of dataset.json; raises if rows went missing."""
        total = kept + sum(self.dropped.values())
        if total != self.input_rows:
            raise AssertionError(f"row accounting broken: read {self.input_rows}, kept {kept}, "
                                 f"dropped {dict(self.dropped)} (sum {total})")
        return {"input_rows": self.input_rows, "kept": kept,
                "dropped": {r: self.dropped[r] for r in REASONS if self.dropped[r]},
                "drop_examples": {r: self.examples[r] for r in REASONS if r in self.examples}}
