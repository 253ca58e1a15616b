"""``cora eval``: score a split with a run's exported adapter, in one process, without DeepSpeed or Ray.

    cora eval --run RUN [--split test] [--batch-size 32]
      -> prints {"auc", "uauc", "n", "warm": {...}, "cold": {...}}; writes RUN/predictions-<split>.parquet

The frozen LLM is loaded as the run's config says (presets are rebuilt from their seed: the same
weights the run trained against), the generator and P from RUN/export, the CF embeddings from the
run's CF_DIR (SASRec: user vectors from each sample's history).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def _embeddings(cf_dir: str, frame, sasrec_len: int):
    from cora.cf.store import read_embeddings
    items = read_embeddings(f"{cf_dir}/item_embeddings.parquet")[frame["item"].to_numpy()]
    meta = json.loads(Path(cf_dir, "cf.json").read_text())
    if meta.get("config", {}).get("model") != "sasrec":
        return read_embeddings(f"{cf_dir}/user_embeddings.parquet")[frame["user"].to_numpy()], items
    from cora.cf.models import pad_history
    from cora.cf.train import load_cf
    model, _ = load_cf(cf_dir)
    with torch.no_grad():
        hist = torch.as_tensor(pad_history(frame["history"], sasrec_len))
        return model.user_vectors_from_history(hist).numpy(), items


def evaluate_run(run: str | Path, split: str = "test", batch_size: int = 32, progress: bool = True) -> dict:
    from tqdm import tqdm

    from cora.data.schema import DatasetError, read_manifest
    from cora.export import load_exported
    from cora.metrics import evaluate
    from cora.prompts import PromptEncoder, get_template
    from cora.scoring import collate
    run = Path(run)
    if not (run / "export" / "adapter.safetensors").is_file() or not (run / "config.json").is_file():
        raise DatasetError(f"{run} is not a finished run (no export/adapter.safetensors or config.json); "
                           f"train one with `cora train`")
    cfg = json.loads((run / "config.json").read_text())
    data_dir, cf_dir = cfg["data"]["data_dir"], cfg["data"]["cf_dir"]
    manifest = read_manifest(data_dir)
    if split not in manifest["shards"]:
        raise DatasetError(f"--split {split!r}: {data_dir} has {', '.join(manifest['shards'])}")
    frame = pq.read_table(Path(data_dir, f"{split}.parquet")).to_pandas()
    titles = pq.read_table(Path(data_dir, "items.parquet")).column("title").to_numpy(zero_copy_only=False)
    model, tok = load_exported(run / "export")
    enc = PromptEncoder(tok, get_template(manifest["domain"]), cfg["data"]["max_history"], cfg["data"]["max_length"])
    user_emb, item_emb = _embeddings(cf_dir, frame, 25)
    scores = np.empty(len(frame), dtype=np.float32)
    with torch.no_grad():
        for s in tqdm(range(0, len(frame), batch_size), desc=f"eval {split}", file=sys.stderr, disable=not progress):
            rows = frame.iloc[s:s + batch_size]
            prompts = [enc.encode(list(titles[np.asarray(h, dtype=np.int64)][-enc.max_history:]) if len(h) else [],
                                  titles[i]) for h, i in zip(rows["history"], rows["item"])]
            batch = collate(prompts, user_emb[s:s + batch_size], item_emb[s:s + batch_size], None, tok.pad_token_id)
            scores[s:s + len(rows)] = model(batch).numpy()
    labels, users = frame["label"].to_numpy(), frame["user"].to_numpy()
    result = evaluate(labels, scores, users, cold=(frame["cold_user"] | frame["cold_item"]).to_numpy())
    pq.write_table(pa.table({"sample_id": frame["sample_id"], "user": users, "item": frame["item"],
                             "label": labels, "score": scores}), run / f"predictions-{split}.parquet")
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a split with a trained run (one process, no DeepSpeed)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by `cora train`")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    result = evaluate_run(args.run, args.split, args.batch_size, progress=not args.no_progress)
    print(json.dumps(result, indent=1))
    return 0
