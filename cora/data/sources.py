"""Readers that turn each supported input into one raw interaction frame, counting every row.

A reader returns ``RawData``: a pandas frame with the columns

    user (str), item (str), rating (float, NaN when absent), label (float, NaN = derive from rating),
    timestamp (int64 unix seconds), order (int64, input order; breaks timestamp ties)

(``collm`` adds ``split`` and ``history``: its own split and history lists, kept as they are) and
the titles of the items by raw id. Rows that cannot be read are dropped and counted by reason in the
``Accounting``; rows whose ids do not resolve against an item/user file are counted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .accounting import Accounting
from .schema import SPLITS, DatasetError

COLUMNS = ("user", "item", "rating", "label", "timestamp", "title")
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass
class RawData:
    frame: pd.DataFrame
    titles: dict[str, str]
    inputs: list[Path]
    defaults: dict = field(default_factory=dict)
    """Source-specific defaults: label_rule, split, domain, and a description for dataset.json."""
    item_file: dict = field(default_factory=dict)
    """Accounting of the item file's own rows (rows, kept, dropped)."""


def _lines(path: Path, sep: str, n_fields: int | None, acc: Accounting, encoding: str,
           min_fields: int = 0) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each well-formed line; malformed ones are counted."""
    out = []
    with open(path, encoding=encoding, newline="") as f:
        for no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue                                    # blank lines are not rows
            acc.read(1)
            parts = line.split(sep)
            ok = (len(parts) == n_fields) if n_fields else len(parts) >= min_fields
            if not ok or any(not p.strip() for p in parts[:2]):
                acc.drop("malformed_row", 1, f"{path.name}:{no}: {line[:80]!r}")
                continue
            out.append((no, parts))
    return out


def _unquote(title: str) -> str:
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1].replace('""', '"')
    return title


def _item_file(path: Path, sep: str, encoding: str, fixed_after: int) -> tuple[dict[str, str], dict]:
    """id -> title from a MovieLens item file: ``id SEP title SEP <fixed_after more fields>``.

    The title is everything between the first field and the last ``fixed_after`` fields, so a title
    that itself contains the separator (quoted or not) is read whole."""
    acc = Accounting("drop")
    titles = {}
    for _, parts in _lines(path, sep, None, acc, encoding, min_fields=2 + fixed_after):
        titles[parts[0].strip()] = _unquote(sep.join(parts[1:len(parts) - fixed_after]))
    info = {"file": path.name, "rows": acc.input_rows, "kept": len(titles), "dropped": dict(acc.dropped)}
    return titles, info


def _numeric(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.astype("string").str.strip(), errors="coerce")


def parse_timestamps(values: pd.Series, unit: str = "s") -> pd.Series:
    """Unix seconds (Int64, <NA> where unparsable) from numbers in ``unit``, datetimes or ISO text."""
    if unit not in TIME_UNITS:
        raise DatasetError(f"unknown timestamp unit {unit!r}; accepted: {', '.join(TIME_UNITS)}")
    if pd.api.types.is_datetime64_any_dtype(values):
        dt = pd.to_datetime(values, utc=True)
        return pd.Series((dt.astype("int64") // 1_000_000_000).where(dt.notna()), dtype="Int64")
    num = _numeric(values)
    out = (num // TIME_UNITS[unit]).astype("Int64")
    text = num.isna() & values.notna()
    if text.any():
        dt = pd.to_datetime(values[text].astype(str), utc=True, errors="coerce", format="ISO8601")
        secs = pd.Series(dt.astype("int64") // 1_000_000_000, index=dt.index).where(dt.notna())
        out[text] = secs.astype("Int64")
    return out


def _frame(rows: list[tuple[int, list[str]]], path: Path, idx: dict[str, int]) -> pd.DataFrame:
    cols = {name: [r[1][i].strip() for r in rows] for name, i in idx.items()}
    f = pd.DataFrame(cols)
    f["line"] = [f"{path.name}:{r[0]}" for r in rows]
    return f


def finish(f: pd.DataFrame, acc: Accounting, *, time_unit: str = "s", has_rating: bool = True) -> pd.DataFrame:
    """Numeric rating/label and parsed timestamps; unreadable rows dropped and counted."""
    where = f["line"] if "line" in f else pd.Series([f"row {i}" for i in range(len(f))])
    describe = lambda c: lambda i: f"{where.iloc[i]}: {c}={f[c].iloc[i]!r}"  # noqa: E731
    f["rating"] = _numeric(f["rating"]) if has_rating else np.nan
    f["label"] = _numeric(f["label"]) if "label" in f else np.nan
    num_col = "rating" if has_rating else "label"
    keep = acc.drop_mask("non_numeric_rating", f[num_col].isna().to_numpy(), describe(num_col))
    f = f[keep]
    where = where[keep]
    if "label" in f and not has_rating:
        bad = ~f["label"].isin([0, 1]).to_numpy()
        keep = acc.drop_mask("bad_label", bad, describe("label"))
        f, where = f[keep], where[keep]
    ts = parse_timestamps(f["timestamp"], time_unit)
    keep = acc.drop_mask("unparsable_timestamp", ts.isna().to_numpy(), describe("timestamp"))
    f = f[keep].assign(timestamp=ts[keep].astype("int64"))
    f["order"] = np.arange(len(f), dtype=np.int64)
    return f.drop(columns=["line"], errors="ignore").reset_index(drop=True)


def _resolve(f: pd.DataFrame, column: str, known, acc: Accounting, reason: str) -> pd.DataFrame:
    keep = acc.drop_mask(reason, ~f[column].isin(known).to_numpy(),
                         lambda i: f"{f['line'].iloc[i]}: {column} {f[column].iloc[i]!r}")
    return f[keep]


def read_movielens(path: Path, acc: Accounting) -> RawData:
    """ML-1M (ratings.dat, movies.dat, users.dat; '::', latin-1) or ML-100K (u.data tab, u.item '|')."""
    if (path / "ratings.dat").is_file():
        if not (path / "movies.dat").is_file():
            raise DatasetError(f"{path} has ratings.dat but no movies.dat (the titles); both are needed")
        titles, info = _item_file(path / "movies.dat", "::", "latin-1", fixed_after=1)
        rows = _lines(path / "ratings.dat", "::", 4, acc, "latin-1")
        f = _frame(rows, path / "ratings.dat", {"user": 0, "item": 1, "rating": 2, "timestamp": 3})
        inputs = [path / "ratings.dat", path / "movies.dat"]
        if (path / "users.dat").is_file():
            users = {p[0].strip() for _, p in _lines(path / "users.dat", "::", None, Accounting(), "latin-1", 1)}
            f = _resolve(f, "user", users, acc, "unresolved_user")
            inputs.append(path / "users.dat")
        variant, split = "ml-1m", "months:14-23,24-28,29-33"
    elif (path / "u.data").is_file():
        if not (path / "u.item").is_file():
            raise DatasetError(f"{path} has u.data but no u.item (the titles); both are needed")
        titles, info = _item_file(path / "u.item", "|", "latin-1", fixed_after=22)
        rows = _lines(path / "u.data", "\t", 4, acc, "latin-1")
        f = _frame(rows, path / "u.data", {"user": 0, "item": 1, "rating": 2, "timestamp": 3})
        inputs = [path / "u.data", path / "u.item"]
        variant, split = "ml-100k", "months:0-3,4-5,6-7"
    else:
        found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else "not a directory"
        raise DatasetError(f"--input {path}: no MovieLens files; expected ratings.dat + movies.dat "
                           f"(ML-1M) or u.data + u.item (ML-100K); found {found}")
    f = _resolve(f, "item", titles, acc, "unresolved_item")
    return RawData(finish(f, acc), titles, inputs, item_file=info,
                   defaults={"label_rule": "rating>=4", "split": split, "domain": "movies", "variant": variant})


def parse_columns(spec: str | None, domain: bool = False) -> dict[str, str]:
    """'user=uid,item=iid,...' -> {'user': 'uid', ...}; our names default to themselves. ``domain``: a
    multi-domain input, whose mapping has 'domain' too."""
    names = COLUMNS + ("domain",) if domain else COLUMNS
    mapping = {c: c for c in names}
    for part in filter(None, (spec or "").split(",")):
        ours, _, theirs = part.partition("=")
        if ours.strip() not in names or not theirs.strip():
            raise DatasetError(f"--columns entry {part!r}: expected NAME=COLUMN with NAME one of "
                               f"{', '.join(names)}")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def read_tabular(path: Path, fmt: str, acc: Accounting, columns: str | None, time_unit: str,
                 domain: bool = False) -> RawData:
    """A user's own log as Parquet or CSV (a file or a directory of files), with a column mapping.
    ``domain``: also read the domain column (a multi-domain input; its values are checked by
    domains.resolve); a row with an empty domain is a malformed row."""
    files = sorted(path.glob(f"*.{fmt}")) if path.is_dir() else [path]
    if not files or not all(p.is_file() for p in files):
        raise DatasetError(f"--input {path}: no .{fmt} file found")
    if fmt == "csv":
        opts = pacsv.ConvertOptions(strings_can_be_null=True)
        tables = [pacsv.read_csv(p, convert_options=opts) for p in files]
    else:
        tables = [pq.read_table(p) for p in files]
    f = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    acc.read(len(f))
    m = parse_columns(columns, domain)
    has_rating = m["rating"] in f.columns
    need = ["user", "item", "timestamp"] + (["rating"] if has_rating else ["label"]) + (["domain"] if domain else [])
    missing = [f"{k} (column {m[k]!r})" for k in need if m[k] not in f.columns]
    if missing:
        raise DatasetError(f"{files[0].name}: missing {', '.join(missing)}; columns present: "
                           f"{', '.join(map(str, f.columns))}; map yours with --columns user=...,item=...,"
                           f"rating=... (or label=...),timestamp=...,title=...{',domain=...' if domain else ''}")
    out = pd.DataFrame({k: f[m[k]] for k in ("user", "item", "timestamp")})
    out["rating"] = f[m["rating"]] if has_rating else None
    if m["label"] in f.columns:
        out["label"] = f[m["label"]]
    out["line"] = [f"{files[0].name if len(files) == 1 else path.name} row {i + 1}" for i in range(len(f))]
    empty = (out["user"].isna() | out["item"].isna()).to_numpy()
    out = out[acc.drop_mask("malformed_row", empty, lambda i: f"{out['line'].iloc[i]}: user/item empty")]
    if domain:
        values = f.loc[out.index, m["domain"]]
        empty = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
        out = out[acc.drop_mask("malformed_row", empty, lambda i: f"{out['line'].iloc[i]}: domain empty")]
        out = out.assign(domain=f.loc[out.index, m["domain"]].astype(str).str.strip())
    out["user"], out["item"] = out["user"].astype(str), out["item"].astype(str)
    titles = {}
    if m["title"] in f.columns:
        t = f.loc[out.index, m["title"]]
        titles = dict(zip(out["item"][t.notna()], t[t.notna()].astype(str)))
    titles = {i: titles.get(i, f"item {i}") for i in out["item"].unique()}
    frame = finish(out.reset_index(drop=True), acc, time_unit=time_unit, has_rating=has_rating)
    return RawData(frame, titles, files, defaults={
        "label_rule": "rating>=4" if has_rating else "label", "split": "time:0.8,0.1,0.1",
        "domain": "items", "variant": fmt})


_COLLM_REQUIRED = ("uid", "iid", "label", "timestamp", "his", "title")


# CoLLM ships subsets beside the full splits (ml-1m: valid_small_ood2.pkl, a 5,200-row subset of
# valid_ood2.pkl that its LLM runs validate on; some releases add test_warm_cold_ood2.pkl)
_COLLM_SUBSETS = ("small", "warm_cold")


def collm_split_file(path: Path, split: str, chosen: str | None = None) -> Path:
    """The file of ``split`` in a CoLLM folder: ``chosen`` (a file name in it) when given; else the only
    ``<split>*.parquet|pkl`` file, or among several the one that is not a derived subset (a name with
    'small' or 'warm_cold'). Which file was used is printed when there was a choice."""
    import sys
    found = sorted(p for p in path.glob(f"{split}*") if p.suffix in (".parquet", ".pkl", ".pickle"))
    names = [p.name for p in found]
    if chosen is not None:
        if chosen not in names:
            raise DatasetError(f"--{split}-file {chosen}: no such {split} file in {path}; found {names}")
        return path / chosen
    full = [p for p in found if not any(s in p.stem for s in _COLLM_SUBSETS)] if len(found) > 1 else found
    if len(full) != 1:
        raise DatasetError(f"--input {path}: expected one {split} file ({split}*.parquet or {split}*.pkl) or one "
                           f"besides CoLLM's subsets (names with {' or '.join(_COLLM_SUBSETS)}), found {names}; "
                           f"choose one with --{split}-file NAME")
    if len(found) > 1:
        print(f"[prepare] {split}: using {full[0].name} (the full split; not "
              f"{', '.join(n for n in names if n != full[0].name)}; choose with --{split}-file)", file=sys.stderr)
    return full[0]


def read_collm(path: Path, acc: Accounting, allow_pickle: bool, files: dict[str, str] | None = None) -> RawData:
    """CoLLM's split files as they are: <split>*.parquet or <split>*.pkl (pickled pandas frames);
    ``files``: {split: file name} chosen by the user (``--valid-file``, ``--test-file``, ``--train-file``)."""
    frames, inputs = [], []
    for split in SPLITS:
        p = collm_split_file(path, split, (files or {}).get(split))
        if p.suffix != ".parquet" and not allow_pickle:
            raise DatasetError(f"{p} is a pickle; unpickling runs code from the file. If you trust it, pass "
                               f"--allow-pickle, or convert it to Parquet first")
        f = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_pickle(p)
        missing = [c for c in _COLLM_REQUIRED if c not in f.columns]
        if missing:
            raise DatasetError(f"{p.name}: missing columns {missing}; CoLLM files have "
                               f"{', '.join(_COLLM_REQUIRED)} (and his_title, not_cold)")
        f = f.assign(split=split, line=[f"{p.name} row {i + 1}" for i in range(len(f))])
        frames.append(f)
        inputs.append(p)
    f = pd.concat(frames, ignore_index=True)
    acc.read(len(f))
    bad = ~f["his"].map(lambda h: isinstance(h, (list, tuple, np.ndarray))).to_numpy()
    f = f[acc.drop_mask("malformed_row", bad, lambda i: f"{f['line'].iloc[i]}: his={f['his'].iloc[i]!r}")]
    titles: dict[str, str] = {}
    for iid, title in zip(f["iid"].astype(str), f["title"].astype(str)):
        titles.setdefault(iid, title)
    if "his_title" in f:
        for his, his_t in zip(f["his"], f["his_title"]):
            for iid, title in zip(his, _split_titles(his_t, len(his))):
                titles.setdefault(str(iid), title)
    out = pd.DataFrame({"user": f["uid"].astype(str), "item": f["iid"].astype(str), "rating": np.nan,
                        "label": f["label"], "timestamp": f["timestamp"], "split": f["split"],
                        "history": [[str(i) for i in h] for h in f["his"]], "line": f["line"]})
    return RawData(finish(out.reset_index(drop=True), acc, has_rating=False), titles, inputs, defaults={
        "label_rule": "label", "split": "given", "domain": "movies", "variant": "collm"})


def _split_titles(his_title, n: int) -> list[str]:
    """CoLLM stores history titles as a list, or as one string of quoted titles joined by ', '."""
    if isinstance(his_title, (list, tuple, np.ndarray)):
        return [str(t) for t in his_title]
    found = re.findall(r'"((?:[^"]|"")*)"', str(his_title))
    return found if len(found) == n else []
