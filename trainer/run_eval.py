"""``cora eval``: score a split with a trained run, in one process, without DeepSpeed or Ray.

    cora eval --run RUN [--split test] [--checkpoint NAME|latest|best] [--device cpu|cuda] [--batch-size 32]
      -> prints {"auc", "uauc", "n", "warm": {...}, "cold": {...}, "source"}; writes
         RUN/predictions-<split>.parquet (the export) or RUN/predictions-<split>-<checkpoint>.parquet

The frozen LLM is loaded as the run's config says (presets are rebuilt from their seed: the same
weights the run trained against). The generator and P come from RUN/export (the adapter of the best
validation so far; the default) or, with ``--checkpoint``, from a committed checkpoint of the run in
run.checkpoint_uri (default RUN/checkpoints): a name (step-000000120, or the step, 120), ``latest``
(the newest that verifies) or ``best`` (the newest saved at a better valid AUC); its files are checked
against its manifest before use, and its own saved config rebuilds the model. The CF embeddings come
from the run's cf_dir, a path or an object-storage URI (s3:// with CORA_S3_ENDPOINT, gs://, file://);
SASRec user vectors from each sample's history. Each row's prompt is the template of its domain (a
multi-domain data directory's "domain" column, else dataset.json's domain) in the method's family.
Progress (samples/s, ETA) goes to stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from cora.data.schema import DatasetError
from cora.fileio import is_remote, join, location, open_fs, read_bytes, read_parquet, write_bytes

SASREC_HISTORY = 25         # the history length SASRec user vectors are computed from (as in cora train)


class EvalError(ValueError):
    """A request ``cora eval`` cannot serve (device, batch size, checkpoint); the message says what to do."""


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device cuda: torch.cuda.is_available() is false (no GPU visible, or torch "
                        f"{torch.__version__} is a CPU-only build); use --device cpu")


# ---------------------------------------------------------------- CF embeddings (local or object storage)

def _open(uri: str):
    """A pyarrow input file for a local path or a storage URI, with a clear error when it is missing."""
    fs, path = open_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise DatasetError(f"{uri} is missing: data.cf_dir in the run's config.json must be a directory written "
                           f"by `cora train-cf`")
    return fs.open_input_file(path)


def cf_embeddings(cf_dir: str, frame, sasrec_len: int = SASREC_HISTORY) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) CF embeddings of every row of ``frame``, (N, d) each, from a CF_DIR (a path or URI)."""
    from cora.cf.store import read_embeddings
    cf_dir = cf_dir.rstrip("/")
    with _open(f"{cf_dir}/item_embeddings.parquet") as f:
        items = read_embeddings(f)[frame["item"].to_numpy()]
    with _open(f"{cf_dir}/cf.json") as f:
        meta = json.loads(f.read())
    if meta.get("config", {}).get("model") != "sasrec":
        with _open(f"{cf_dir}/user_embeddings.parquet") as f:
            return read_embeddings(f)[frame["user"].to_numpy()], items
    from cora.cf.models import pad_history
    model = _sasrec(cf_dir)
    with torch.no_grad():
        hist = torch.as_tensor(pad_history(frame["history"], sasrec_len))     # (N, L), left-padded
        return model.user_vectors_from_history(hist).numpy(), items


def _sasrec(cf_dir: str):
    """The SASRec model of a CF_DIR. ``load_cf`` reads local directories only, so from object storage
    the two files it reads (cf.json, and model.safetensors, whose sha256 it checks) are copied to a
    temporary directory first."""
    from cora.cf.train import load_cf
    if not is_remote(cf_dir):
        return load_cf(cf_dir.removeprefix("file://"))[0]
    with tempfile.TemporaryDirectory(prefix="cora-eval-cf-") as tmp:
        for name in ("cf.json", "model.safetensors"):
            with _open(f"{cf_dir}/{name}") as f:
                Path(tmp, name).write_bytes(f.read())
        return load_cf(tmp)[0]


# ---------------------------------------------------------------- the generator and P

def find_checkpoint(uri: str, which: str) -> tuple[str, dict, dict[str, bytes]]:
    """(name, manifest, verified file bytes) of the committed checkpoint in ``uri`` that ``which`` names:
    NAME (step-000000120, or the step 120), ``latest`` (the newest that verifies) or ``best`` (the newest
    committed at a better valid AUC: the one pruning keeps)."""
    from trainer.checkpoint import (CheckpointError, checkpoint_name, latest_committed, list_checkpoints,
                                    read_checkpoint, read_commit)
    committed = {}
    for n in list_checkpoints(uri):
        try:
            committed[n] = read_commit(uri, n)
        except CheckpointError:
            pass
    have = f"committed: {', '.join(committed)}" if committed else "it holds no committed checkpoint"
    if which == "latest":
        found = latest_committed(uri)
        if found is None:
            raise EvalError(f"--checkpoint latest: {uri} has no committed checkpoint that verifies ({have})")
        return found
    if which == "best":
        best = [n for n, m in committed.items() if m.get("best")]
        if not best:
            raise EvalError(f"--checkpoint best: no checkpoint in {uri} was saved at a better valid AUC ({have}); "
                            f"use --checkpoint latest or a name")
        name = best[-1]
    else:
        name = checkpoint_name(int(which)) if which.isdigit() else which
        if name not in committed:
            raise EvalError(f"--checkpoint {which}: no committed checkpoint {name} in {uri} ({have}; or use "
                            f"latest, best)")
    try:
        manifest, files = read_checkpoint(uri, name)
    except CheckpointError as e:
        raise EvalError(f"--checkpoint {which}: {e}") from None
    return name, manifest, files


def load_model(run: str, run_config: dict, checkpoint: str | None = None) -> tuple[object, object, str]:
    """(CoRAModel in eval mode, tokenizer, source) with the generator and P of RUN/export (checkpoint
    None; source "export") or of a committed checkpoint (source "checkpoint step-..."); RUN a path or URI."""
    if checkpoint is None:
        from cora.export import load_exported
        export = join(run, "export")
        with tempfile.TemporaryDirectory(prefix="cora-eval-export-") as tmp:
            try:                          # two small files; from object storage through a local copy
                for name in ("adapter.safetensors", "config.json"):
                    Path(tmp, name).write_bytes(read_bytes(join(export, name)))
            except FileNotFoundError:
                raise DatasetError(f"{run} has no export/{name} (it is written at each better valid AUC: no "
                                   f"validation has finished); evaluate a checkpoint with --checkpoint latest") from None
            print(f"[eval] generator and P from {export}", file=sys.stderr)
            model, tok = load_exported(tmp)
        return model, tok, "export"
    from trainer.checkpoint import CheckpointError, parse
    uri = run_config["run"].get("checkpoint_uri") or join(run, "checkpoints")
    name, manifest, files = find_checkpoint(uri, checkpoint)
    try:
        trainable, _, _, state = parse(files)
    except CheckpointError as e:
        raise EvalError(f"--checkpoint {checkpoint}: {uri}/{name}: {e}") from None
    from cora.export import build_model
    model, tok = build_model(state["config"])
    # the workers save CoRAModel.named_parameters() names (Recipe.model, not the DeepSpeed engine, whose
    # names would carry a "module." prefix): the same names as this one-process model's
    from trainer.checkpoint.zero_state import STATE
    extra = {n[len(STATE):]: trainable.pop(n) for n in list(trainable) if n.startswith(STATE)}
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in trainable.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise EvalError(f"{uri}/{name}/trainable.safetensors does not fit the model its own config describes "
                        f"(e.g. {diff}); it was not written by `cora train`")
    model.load_state_dict(trainable, strict=False)
    with torch.no_grad():
        model.method.load_state(model, extra)
    print(f"[eval] generator and P from checkpoint {name} (step {manifest['step']}"
          f"{', best' if manifest.get('best') else ''}) in {uri}", file=sys.stderr)
    return model.eval(), tok, f"checkpoint {name}"


# ---------------------------------------------------------------- scoring

def _score(model, tok, encoders: dict, domains: np.ndarray, frame, titles, emb: tuple, batch_size: int, device: str,
           progress: bool, desc: str, item_table: np.ndarray | None = None) -> np.ndarray:
    """The score (the method's: the "Yes" logit, Laser's cosine) of every row of ``frame``, (N,) float32,
    ``batch_size`` rows per forward; row k's prompt is built by ``encoders[domains[k]]``; ``item_table``:
    the CF item embeddings, for a method that reads the history's (Laser)."""
    from tqdm import tqdm

    from cora.scoring import collate
    user_emb, item_emb = emb
    slotted = bool(next(iter(encoders.values())).template.slots)
    scores = np.empty(len(frame), dtype=np.float32)
    bar = tqdm(total=len(frame), desc=desc, unit="sample", file=sys.stderr, disable=not progress)
    with torch.no_grad(), bar:
        for s in range(0, len(frame), batch_size):
            rows = frame.iloc[s:s + batch_size]
            encs = [encoders[d] for d in domains[s:s + batch_size]]
            encoded = [enc.encode_with_slots(list(titles[np.asarray(h, dtype=np.int64)][-enc.max_history:])
                                             if len(h) else [], titles[i])
                       for enc, h, i in zip(encs, rows["history"], rows["item"])]
            batch = collate([e[0] for e in encoded], user_emb[s:s + batch_size], item_emb[s:s + batch_size], None,
                            tok.pad_token_id, slots=[e[1] for e in encoded] if slotted else None)
            batch.items = torch.as_tensor(rows["item"].to_numpy(), dtype=torch.long)
            batch.users = torch.as_tensor(rows["user"].to_numpy(), dtype=torch.long)
            if model.method.history_items:
                from cora.laser import history_embeddings
                h_emb, h_pad = history_embeddings(rows["history"], item_table, model.method.history_items,
                                                  item_table.shape[1])
                batch.history_emb, batch.history_pad = torch.from_numpy(h_emb), torch.from_numpy(h_pad)
            scores[s:s + len(rows)] = model(batch.to(device)).cpu().numpy()
            bar.update(len(rows))
    return scores


def _encoders(tok, family: str, manifest: dict, frame, data_cfg: dict) -> tuple[dict, np.ndarray]:
    """(one PromptEncoder per domain of the data directory, the domain of each row of ``frame``): a
    multi-domain directory's rows carry theirs ("domain"), a single-domain one's all take dataset.json's."""
    from cora.data.schema import manifest_domains
    from cora.prompts import domain_encoders
    held = manifest_domains(manifest)
    encoders = domain_encoders(tok, family, held, data_cfg["max_history"], data_cfg["max_length"])
    if "domain" not in frame:
        return encoders, np.full(len(frame), held[0], dtype=object)
    domains = frame["domain"].to_numpy(dtype=object)
    unknown = sorted(set(domains) - set(held))
    if unknown:
        raise DatasetError(f"rows of domain(s) {', '.join(map(repr, unknown))}, which dataset.json's domains "
                           f"({', '.join(held)}) do not list; prepare the data again")
    return encoders, domains


def evaluate_run(run: str | Path, split: str = "test", batch_size: int = 32, progress: bool = True,
                 device: str = "cpu", checkpoint: str | None = None) -> dict:
    """Score ``split`` with the run's export (or ``checkpoint``) on ``device``; metrics plus "source"."""
    from cora.data.schema import read_manifest
    from cora.metrics import evaluate
    check_device(device)
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    run = location(run)
    try:
        cfg = json.loads(read_bytes(join(run, "config.json")))
    except FileNotFoundError:
        raise DatasetError(f"{run} is not a run directory (no config.json); train one with `cora train`") from None
    except OSError as e:
        raise DatasetError(f"cannot read {run}/config.json ({type(e).__name__}: {e}); check the URI, the endpoint "
                           f"(CORA_S3_ENDPOINT) and this machine's storage credentials") from None
    data_dir, cf_dir = cfg["data"]["data_dir"], cfg["data"]["cf_dir"]
    manifest = read_manifest(data_dir)
    if split not in manifest["shards"]:
        raise DatasetError(f"--split {split!r}: {data_dir} has {', '.join(manifest['shards'])}")
    model, tok, source = load_model(run, cfg, checkpoint)
    model.to(device)
    frame = read_parquet(join(data_dir, f"{split}.parquet")).to_pandas()
    titles = read_parquet(join(data_dir, "items.parquet")).column("title").to_numpy(zero_copy_only=False)
    encoders, domains = _encoders(tok, model.method.template, manifest, frame, cfg["data"])
    emb = cf_embeddings(cf_dir, frame)
    item_table = None
    if model.method.history_items:
        from cora.cf.store import read_embeddings
        with _open(f"{cf_dir.rstrip('/')}/item_embeddings.parquet") as f:
            item_table = read_embeddings(f)
    scores = _score(model, tok, encoders, domains, frame, titles, emb, batch_size, device, progress, f"eval {split}",
                    item_table)
    labels, users = frame["label"].to_numpy(), frame["user"].to_numpy()
    result = evaluate(labels, scores, users, cold=(frame["cold_user"] | frame["cold_item"]).to_numpy())
    if "query" in frame:                 # the rank split: each test positive among its recorded negatives
        from cora.metrics import ranking
        result["ranking"] = ranking(frame["query"].to_numpy(), labels, scores, users=users)
    suffix = "" if source == "export" else f"-{source.split()[-1]}"
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"sample_id": frame["sample_id"], "user": users, "item": frame["item"],
                             "label": labels, "score": scores}), sink)
    write_bytes(join(run, f"predictions-{split}{suffix}.parquet"), sink.getvalue().to_pybytes())
    return dict(result, source=source)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a split with a trained run (one process, no DeepSpeed)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by `cora train` (a path, or s3://, gs://, "
                                                "file://)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "rank"],
                   help="rank: the candidate split of `cora prepare --rank-negatives` (adds ranking metrics)")
    p.add_argument("--checkpoint", default=None, metavar="NAME|latest|best",
                   help="the generator and P of a committed checkpoint of the run (default: RUN/export)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        result = evaluate_run(args.run, args.split, args.batch_size, progress=not args.no_progress,
                              device=args.device, checkpoint=args.checkpoint)
    except (EvalError, DatasetError) as e:
        print(f"cora eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
