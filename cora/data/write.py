"""Writing a prepared data directory: Parquet tables, WebDataset shards, dataset.json, atomically.

Everything is written into a temporary sibling directory (``.NAME.tmp-XXXX``, see
``cora.fileio.write_atomically``) and renamed into place only when complete, dataset.json (with the
sha256 of every other file) last; a failed or killed run leaves no directory that looks finished. ``verify`` re-checks a directory against its dataset.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from ..fileio import FILES_VERSION, file_entry, file_problem, open_fs, write_atomically
from .protocol import Prepared
from .schema import (INTERACTIONS, ITEMS, RANK, RANK_SPLIT, SPLITS, USERS, DatasetError, read_manifest,
                     with_domain)


def _table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` as ``schema``; a frame with a "domain" column (a multi-domain directory) keeps it, last."""
    if "domain" in frame:
        schema = with_domain(schema)
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def write_shards(frame: pd.DataFrame, titles: np.ndarray, split: str, shard_dir: Path,
                 per_shard: int, in_prompt: int, progress: bool) -> list[str]:
    """``<split>-NNNNNN.tar`` files of ``per_shard`` samples each (the last may hold fewer); one
    ``<sample_id>.json`` member per sample (plus "query" when the frame has that column: the rank
    split; and "domain" when it has that one: a multi-domain directory); mtime 0, so equal data gives
    byte-identical shards."""
    names = []
    cols = [frame[c].to_numpy() for c in ("sample_id", "user", "item", "label", "timestamp", "history",
                                           "cold_user", "cold_item")]
    cols += [frame[c].to_numpy() if c in frame else np.full(len(frame), None) for c in ("query", "domain")]
    bar = tqdm(total=len(frame), desc=f"shards {split}", unit="sample", file=sys.stderr,
               disable=not progress, leave=False)
    for start in range(0, len(frame), per_shard):
        name = f"{split}-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(shard_dir / name), mtime=0, encoder=False) as sink:
            for sid, u, i, y, ts, hist, cu, ci, q, dom in zip(*(c[start:start + per_shard] for c in cols)):
                sample = {"sample_id": int(sid), "user": int(u), "item": int(i), "label": int(y),
                          "timestamp": int(ts), "history": hist.tolist(), "title": titles[i],
                          "history_titles": titles[hist[-in_prompt:]].tolist() if in_prompt else [],
                          "cold_user": bool(cu), "cold_item": bool(ci)}
                if q is not None:
                    sample["query"] = int(q)
                if dom is not None:
                    sample["domain"] = str(dom)
                sink.write({"__key__": f"{sid:012d}", "json": json.dumps(sample).encode()})
        bar.update(min(per_shard, len(frame) - start))
        names.append(f"shards/{name}")
    bar.close()
    return names


def counts(f: pd.DataFrame) -> dict:
    """dataset.json's counts of one split."""
    cold = f["cold_user"] | f["cold_item"]
    return {"rows": len(f), "positives": int(f["label"].sum()), "users": int(f["user"].nunique()),
            "items": int(f["item"].nunique()), "warm": int((~cold).sum()), "cold": int(cold.sum()),
            "empty_history": int((f["history"].map(len) == 0).sum())}


def split_counts(frame: pd.DataFrame) -> dict:
    return {split: counts(frame[frame["split"] == split]) for split in SPLITS}


def write_dataset(prep: Prepared, out: Path, manifest: dict, *, samples_per_shard: int,
                  history_in_prompt: int, overwrite: bool, progress: bool,
                  rank: pd.DataFrame | None = None) -> dict:
    """Write everything under a temporary directory, then move it to ``out``; returns dataset.json.

    ``rank``: the rank split (candidates.rank_split), written like the others as rank.parquet and
    shards/rank-NNNNNN.tar, or None."""
    result = {}

    def write(tmp: Path) -> None:
        if out.exists() and any(out.iterdir()) and not overwrite:
            # checked up front too; this guards a directory filled meanwhile
            raise DatasetError(f"{out} appeared while preparing; not replacing it without --overwrite")
        (tmp / "shards").mkdir()
        titles = prep.items["title"].to_numpy(dtype=object)
        shards = {}
        frames = [(split, prep.frame[prep.frame["split"] == split], INTERACTIONS) for split in SPLITS]
        for split, f, schema in frames + ([(RANK_SPLIT, rank, RANK)] if rank is not None else []):
            pq.write_table(_table(f, schema), tmp / f"{split}.parquet")
            shards[split] = write_shards(f, titles, split, tmp / "shards", samples_per_shard,
                                         history_in_prompt, progress)
        pq.write_table(_table(prep.items, ITEMS), tmp / "items.parquet")
        pq.write_table(_table(prep.users, USERS), tmp / "users.parquet")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        result.update(manifest, num_users=len(prep.users), num_items=len(prep.items),
                      split_boundaries=prep.boundaries, shards=shards,
                      files_version=FILES_VERSION, files={str(p.relative_to(tmp)): file_entry(p) for p in files})
        result["counts"]["splits"] = split_counts(prep.frame)
        if rank is not None:
            result["counts"]["splits"][RANK_SPLIT] = counts(rank)
        (tmp / "dataset.json").write_text(json.dumps(result, indent=1))   # last: marks it complete

    write_atomically(out, write)
    return result


def publish(local: Path, uri: str) -> None:
    """Upload the prepared directory ``local`` to object storage ``uri`` so that it is complete only when its
    dataset.json is: a dataset.json already there is deleted first (then everything else under ``uri``),
    every other file is uploaded, dataset.json last. A failure leaves ``uri`` without dataset.json, which
    every reader refuses ("not a prepared data directory")."""
    import pyarrow.fs as pafs
    fs, root = open_fs(uri)
    try:
        if fs.get_file_info(f"{root}/dataset.json").type == pafs.FileType.File:
            fs.delete_file(f"{root}/dataset.json")            # the old directory stops being complete first
        fs.delete_dir_contents(root, missing_dir_ok=True)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != "dataset.json")
        for p in [*files, local / "dataset.json"]:
            with open(p, "rb") as src, fs.open_output_stream(f"{root}/{p.relative_to(local).as_posix()}") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    except OSError as e:
        raise DatasetError(f"uploading the prepared data to {uri} failed ({type(e).__name__}: {e}); {uri} has no "
                           f"dataset.json now, so nothing reads it as a data directory: check the storage and run "
                           f"`cora prepare` again") from None


def verify(data_dir: str | Path) -> dict:
    """Re-check every file of a prepared directory against dataset.json; raises naming the first bad one."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for rel, want in manifest["files"].items():
        problem = file_problem(data_dir / rel, want)
        if problem:
            raise DatasetError(f"{data_dir / rel} {problem} (dataset.json); prepare the data again")
    return manifest
