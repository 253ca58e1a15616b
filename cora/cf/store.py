"""Files of a trained CF run (CF_DIR) and how they are written: all at once or not at all.

    CF_DIR/
      metrics.json              valid/test AUC and UAUC, warm/cold test subsets, the epoch log
      user_embeddings.parquet   user int32, embedding fixed_size_list<float32>[d]  (all num_users)
      item_embeddings.parquet   item int32, embedding fixed_size_list<float32>[d]  (all num_items)
      model.safetensors         the model's state dict (safetensors only, never pickle)
      test_predictions.parquet  the best model's test logits, one row per test.parquet row, same order:
                                sample_id int64, user int32, item int32, label int8, score float32
                                (runs written before this file existed lack it; nothing requires it)
      cf.json                   model name, config, sizes, the dataset identity, sha256 of the files

The run is written into a temporary sibling directory and renamed into place, so a reader never
sees a half-written CF_DIR. An existing non-empty CF_DIR is replaced only when it holds the same run
(same config and dataset) or when ``overwrite`` is set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cora.data.schema import DatasetError
from cora.fileio import file_problem, sha256, write_atomically  # noqa: F401 - re-exported

CF_FORMAT = "cora-cf"
CF_FORMAT_VERSION = 1
FILES = ("metrics.json", "user_embeddings.parquet", "item_embeddings.parquet", "model.safetensors",
         "test_predictions.parquet", "cf.json")
PREDICTIONS = pa.schema([("sample_id", pa.int64()), ("user", pa.int32()), ("item", pa.int32()),
                         ("label", pa.int8()), ("score", pa.float32())])


def dataset_identity(data_dir: str | Path, manifest: dict) -> dict:
    """What identifies the data a run was trained on: dataset.json's sha256, its checksums and the
    preparation's fingerprint (inputs + options: equal fingerprints mean equal ids and splits)."""
    data_dir = Path(data_dir)
    return {"data_dir": str(data_dir.resolve()),
            "dataset_json_sha256": sha256(data_dir / "dataset.json"),
            "checksums": manifest.get("checksums"), "fingerprint": manifest.get("fingerprint")}


def trained_elsewhere(cf_dir: str | Path, data_dir: str | Path) -> str | None:
    """Why the CF run ``cf_dir`` cannot serve ``data_dir`` (None when it can): it was trained on another
    prepared directory. The same dataset.json, or the same preparation fingerprint (the directory prepared
    again or copied: same inputs and options, hence the same user/item ids and splits), proves them
    compatible; anything else is refused, because the embeddings' rows would belong to other users and items."""
    from cora.data.schema import read_manifest
    meta = read_meta(cf_dir)
    trained = meta.get("dataset", {})
    manifest = read_manifest(data_dir)
    here = sha256(Path(data_dir) / "dataset.json")
    if trained.get("dataset_json_sha256") == here:
        return None
    if trained.get("fingerprint") is not None and trained.get("fingerprint") == manifest.get("fingerprint"):
        return None
    return (f"{cf_dir} was trained on {trained.get('data_dir')} (dataset.json sha256 "
            f"{str(trained.get('dataset_json_sha256'))[:12]}..., fingerprint {str(trained.get('fingerprint'))[:12]}...), "
            f"not on {data_dir} (sha256 {here[:12]}..., fingerprint "
            f"{str(manifest.get('fingerprint'))[:12]}...): its embedding rows would belong to other users and items; "
            f"train a CF model on this data (`cora train-cf --data {data_dir} --out CF_DIR`) and point data.cf_dir "
            f"at it, or point data.data_dir at the data it was trained on")


def embedding_table(key: str, vectors: np.ndarray) -> pa.Table:
    """(n, d) float vectors -> table (key int32 = row index, embedding fixed_size_list<float32>[d])."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))    # (n * d,)
    emb = pa.FixedSizeListArray.from_arrays(flat, d)                                # (n,) of [d]
    return pa.table({key: pa.array(np.arange(n, dtype=np.int32)), "embedding": emb})


def predictions_table(sample_ids: np.ndarray, users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                      scores: np.ndarray) -> pa.Table:
    """(N,) aligned columns -> a PREDICTIONS table; ``scores`` are logits (float32 holds the float32
    model output exactly)."""
    columns = {"sample_id": np.asarray(sample_ids, dtype=np.int64), "user": np.asarray(users, dtype=np.int32),
               "item": np.asarray(items, dtype=np.int32), "label": np.asarray(labels, dtype=np.int8),
               "score": np.asarray(scores, dtype=np.float32)}
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"prediction columns are not aligned: lengths {lengths}; pass one value per test row")
    return pa.table(columns, schema=PREDICTIONS)


def read_embeddings(path: str | Path) -> np.ndarray:
    """(n, d) float32 from an embedding table, rows ordered by id (ids must be 0..n-1)."""
    table = pq.read_table(path)
    key = table.column_names[0]
    ids = table.column(key).to_numpy()
    emb = table.column("embedding").combine_chunks()
    d = emb.type.list_size
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    out = np.empty((len(ids), d), dtype=np.float32)
    out[ids] = flat.reshape(len(ids), d)
    return out


def same_run(meta: dict, config: dict, identity: dict) -> bool:
    """Whether an existing cf.json describes the run (config, dataset) about to be written."""
    return (meta.get("config") == config
            and meta.get("dataset", {}).get("dataset_json_sha256") == identity["dataset_json_sha256"])


def check_out_dir(out_dir: Path, config: dict, identity: dict, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` holding anything but this same run, unless ``overwrite``."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another --out")
    if not any(out_dir.iterdir()):
        return
    meta_path = out_dir / "cf.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and same_run(meta, config, identity):
        return
    what = (f"a different CF run (model={meta.get('model')!r}, config or dataset differ)" if meta is not None
            else "files that are not a CF run")
    raise FileExistsError(f"{out_dir} already holds {what}; pass overwrite=True (--overwrite) to replace "
                          f"it, or choose another output directory")


def read_meta(cf_dir: str | Path) -> dict:
    """cf.json of a CF run, with a clear error when ``cf_dir`` is not one."""
    cf_dir = Path(cf_dir)
    path = cf_dir / "cf.json"
    if not path.is_file():
        raise DatasetError(f"{cf_dir} is not a CF run (no cf.json); create it with "
                           f"`cora train-cf --data DATA_DIR --out {cf_dir}`")
    meta = json.loads(path.read_text())
    if meta.get("format") != CF_FORMAT or meta.get("format_version") != CF_FORMAT_VERSION:
        raise DatasetError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                           f"this version of cora reads {CF_FORMAT!r} version {CF_FORMAT_VERSION}: train again")
    return meta


def verify_file(cf_dir: Path, meta: dict, name: str) -> Path:
    """Path of ``name`` in the run, after checking its sha256 against cf.json."""
    path = cf_dir / name
    if not path.is_file():
        raise DatasetError(f"{path} is missing; the CF run is incomplete: train it again")
    expected = meta.get("files", {}).get(name)
    problem = None if expected is None else file_problem(path, expected)
    if problem:
        raise DatasetError(f"{path} {problem} (cf.json); train the CF model again")
    return path
