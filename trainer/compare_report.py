"""The report of ``cora compare`` (trainer/compare.py): one row per method as table cells, compare.csv,
compare.md (the table, the notes, and the differences from the --versus row with their intervals) and
compare.png."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

BASE_COLUMNS = ("method", "auc", "uauc", "n", "untrained_auc", "untrained_uauc", "warm_auc", "warm_uauc", "warm_n",
                "cold_auc", "cold_uauc", "cold_n")
COST_COLUMNS = ("trainable_parameters", "samples_per_second", "steps", "train_seconds")
RANK_KEY = re.compile(r"(recall|ndcg)@(\d+)|mrr")
UNTRAINED_RANK = ("recall@10", "ndcg@10")
"""Ranking metrics also reported before the first step (untrained_recall@10, ...: the run's
no_injection_ranking), beside the trained ones: Laser's paper judges it by these, not by AUC."""


def row(method: str, metrics: dict) -> dict:
    """One table row from a run's metrics.json (or a dict of its shape); what it lacks stays None. untrained_*:
    the same model's test scores before its first step (the run's no_injection_test: its own no-training
    baseline, e.g. Laser's untrained M-Former, RecCocktail's merge at (1/2, 1/2))."""
    test = metrics.get("test") or {}
    out: dict = {"method": method}
    for prefix, part in (("", test), ("warm_", test.get("warm") or {}), ("cold_", test.get("cold") or {})):
        for key in ("auc", "uauc", "n"):
            out[prefix + key] = part.get(key)
    untrained = metrics.get("no_injection_test") or {}
    out.update(untrained_auc=untrained.get("auc"), untrained_uauc=untrained.get("uauc"))
    out.update({k: v for k, v in (metrics.get("ranking") or {}).items() if RANK_KEY.fullmatch(k)})
    untrained_rank = metrics.get("no_injection_ranking") or {}
    out.update({f"untrained_{k}": untrained_rank[k] for k in UNTRAINED_RANK if k in untrained_rank})
    out.update({k: metrics.get(k) for k in COST_COLUMNS})
    return out


def columns(rows: list[dict]) -> list[str]:
    """The table's columns: the test metrics, the ranking metrics any row has, the cost."""
    def order(key: str) -> tuple:
        m = RANK_KEY.fullmatch(key)
        return (("recall", "ndcg").index(m.group(1)), int(m.group(2))) if m.group(1) else (2, 0)
    ranked = sorted({k for r in rows for k in r if RANK_KEY.fullmatch(k)}, key=order)
    untrained = [f"untrained_{k}" for k in UNTRAINED_RANK if any(f"untrained_{k}" in r for r in rows)]
    return list(BASE_COLUMNS) + ranked + untrained + list(COST_COLUMNS)


def cell(value, digits: int | None = None) -> str:
    """A table cell: empty for a missing or non-finite value; floats in full (``digits`` None) or rounded."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if digits is None else f"{value:.{digits}f}"
    return str(value)


def _digits(column: str) -> int:
    return {"samples_per_second": 1, "train_seconds": 2}.get(column, 4)


def markdown_table(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c), _digits(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[cell(r.get(c)) for c in cols] for r in rows])


def write_markdown(rows: list[dict], path: Path, command: str, context: str, notes: dict[str, str],
                   extra: str = "") -> None:
    text = [f"# Method comparison: {path.parent.name}", "", "Produced by", "", "```", command, "```", "",
            context, "", markdown_table(rows), ""]
    text += [f"- **{m}**: {notes[m]}" for m in (r["method"] for r in rows) if m in notes]
    if extra:
        text += ["", extra]
    path.write_text("\n".join(text) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """compare.png: test AUC and UAUC per method, overall / warm / cold side by side."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows)) * 2, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    x, width = np.arange(len(rows)), 0.27
    for ax, metric in zip(fig.subplots(1, 2), ("auc", "uauc")):
        for j, part in enumerate(("", "warm_", "cold_")):
            values = [r.get(part + metric) for r in rows]
            values = [v if isinstance(v, (int, float)) and math.isfinite(v) else np.nan for v in values]
            bars = ax.bar(x + (j - 1) * width, values, width, label=(part.rstrip("_") or "overall"))
            ax.bar_label(bars, ["" if np.isnan(v) else f"{v:.3f}" for v in values], fontsize=7, rotation=90,
                         padding=2)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")          # a random scorer
        ax.set_xticks(x, [r["method"] for r in rows])
        ax.set_ylim(0, 1.2)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(f"test {metric.upper()}")
        ax.legend(loc="upper center", ncols=3, fontsize="small", frameon=False)
    fig.savefig(path, dpi=100)


UNTRAINED = "untrained"
"""The ``versus`` of a row measured against its own run's model before the first step."""


def differences_markdown(diffs: list[dict], versus: str, reps: int) -> str:
    """A section of compare.md: paired_differences as a table (``versus`` UNTRAINED: each method against its
    own untrained model)."""
    if versus == UNTRAINED:
        heading, whose = "Each method against its own untrained model", "its own model's before the first step"
        ref = "that model"
    else:
        heading, whose, ref = f"Differences from {versus}, with their uncertainty", f"{versus}'s", versus
    text = [f"## {heading}", "",
            f"Each method's test AUC and UAUC minus {whose} on the same rows. The interval is a 95% paired "
            f"bootstrap over users ({reps} resamples of the users, every row of a drawn user kept: a user's rows "
            f"are not independent); P is the share of resamples where the method is not above {ref}.", "",
            "| method | subset | n | users | AUC diff | 95% interval | P(not above) | UAUC diff | 95% interval "
            "| P(not above) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in diffs:
        cells = [d["method"], d["subset"], str(d["n"]), str(d["users"])]
        for key in ("auc", "uauc"):
            if d[f"{key}_diff"] is None:
                cells += ["", "", ""]
            else:
                cells += [f"{d[f'{key}_diff']:+.4f}", f"[{d[f'{key}_low']:+.4f}, {d[f'{key}_high']:+.4f}]",
                          f"{d[f'{key}_p_not_above']:.3f}"]
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n"
