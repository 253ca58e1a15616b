"""Training a CF model (MF, LightGCN or SASRec) on a prepared data directory.

    loss = BCE-with-logits(score(u, i), label) on the train split, Adam (L2 weight decay),
    shuffled mini-batches (seeded torch.Generator), valid AUC after every epoch, early stopping
    after ``patience`` epochs without improvement; the best epoch's state is kept and evaluated on
    valid and test (test also on its warm and cold subsets; cold = cold_user | cold_item). The
    best state's test logits are kept and written to CF_DIR/test_predictions.parquet, so that the
    reported test metrics can be recomputed from the file.

Life cycle: ``setup`` (model, optimiser) -> ``train_epoch`` -> ``evaluate_split`` -> ``fit_cf`` (the
loop, in memory; the benchmark uses it directly) -> ``train_cf`` (read DATA_DIR, fit, write CF_DIR
atomically, see cora.cf.store) and ``load_cf`` (rebuild the model from CF_DIR alone).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cora.cf import store
from cora.cf.data import CFData, Split, load_data
from cora.cf.models import HISTORY_PAD, MODEL_NAMES, CFBatch, CFModel, build_model
from cora.config import ConfigError, from_dict
from cora.data.schema import DatasetError
from cora.fileio import FILES_VERSION, file_entry
from cora.metrics import evaluate


@dataclass
class CFConfig:
    """How a CF model is built and trained (DESIGN.md section 2)."""

    model: Literal["mf", "lightgcn", "sasrec"] = "mf"
    """Which CF model: 'mf' (the paper's default), 'lightgcn' or 'sasrec'."""
    dim: int = 256
    """Embedding size d of user and item vectors."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam's L2 weight decay (coupled, as torch.optim.Adam)."""
    batch_size: int = 2048
    """Training mini-batch size."""
    eval_batch_size: int = 8192
    """Rows scored at once when evaluating (memory only; does not change results)."""
    max_epochs: int = 100
    """Upper bound on training epochs."""
    patience: int = 5
    """Stop after this many epochs without a better valid AUC, once ``min_epochs`` have run."""
    min_epochs: int = 20
    """Epochs always run before early stopping may stop (capped at ``max_epochs``): on a small validation
    set the valid AUC of the first epochs is flat noise, and ``patience`` alone stops there."""
    lightgcn_layers: int = 2
    """LightGCN: propagation layers K."""
    sasrec_blocks: int = 2
    """SASRec: transformer blocks."""
    sasrec_heads: int = 1
    """SASRec: attention heads (must divide dim)."""
    sasrec_dropout: float = 0.2
    """SASRec: dropout on embeddings, attention and feed-forward."""
    max_history: int = 25
    """SASRec: history length L (the most recent L earlier positives)."""
    seed: int = 0
    """Seeds initialisation, dropout and the shuffling generator."""
    threads: int | None = None
    """torch intra-op threads while training; None keeps torch's default."""

    def validate(self) -> list[str]:
        problems = []
        for name in ("dim", "batch_size", "eval_batch_size", "max_epochs", "patience", "min_epochs", "sasrec_blocks",
                     "sasrec_heads", "max_history"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.model not in MODEL_NAMES:
            problems.append(f"model {self.model!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lightgcn_layers < 0:
            problems.append(f"lightgcn_layers must be >= 0, got {self.lightgcn_layers}")
        if not 0.0 <= self.sasrec_dropout < 1.0:
            problems.append(f"sasrec_dropout must be in [0, 1), got {self.sasrec_dropout}")
        if self.model == "sasrec" and self.sasrec_heads > 0 and self.dim % self.sasrec_heads:
            problems.append(f"dim {self.dim} is not divisible by sasrec_heads {self.sasrec_heads}; "
                            f"pick heads that divide dim")
        if self.threads is not None and self.threads <= 0:
            problems.append(f"threads must be a positive integer or None, got {self.threads}")
        return problems

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "CFConfig":
        """Build and validate, raising one ConfigError listing every problem."""
        return from_dict(cls, data, source=source)


@dataclass
class FitResult:
    """What ``fit_cf`` returns: the best model and its record."""

    model: CFModel
    """The model holding the best epoch's state, in eval mode."""
    metrics: dict
    """valid/test metrics, best_epoch, epochs_run, the per-epoch log, timings."""
    epochs: list[dict] = field(default_factory=list)
    """Per epoch: loss, valid_auc, valid_uauc, train_seconds, eval_seconds."""
    test_scores: np.ndarray | None = None
    """(N_test,) float64 logits of the best model on the test split: what metrics["test"] is computed from."""


# ----------------------------------------------------------------------------- set-up
def train_edges(train: Split) -> torch.Tensor:
    """(2, E) (user, item) pairs of the train positives: LightGCN's graph."""
    pos = train.labels > 0.5
    return torch.stack([train.users[pos], train.items[pos]])


def check_data(data: CFData, cfg: CFConfig) -> None:
    """Fail before training on data that cannot train or be evaluated, naming the split."""
    if len(data.train) == 0:
        raise DatasetError("the train split has no rows; CF training needs training interactions")
    for name in ("valid", "test"):
        split = getattr(data, name)
        n_pos = int(split.labels.sum())
        if n_pos in (0, len(split)):
            raise DatasetError(f"the {name} split has {len(split)} rows, {n_pos} positive: AUC needs both "
                               f"labels, so the CF model cannot be selected/evaluated; prepare the data "
                               f"with a split that has positives and negatives")
    if cfg.model == "sasrec" and any(s.history is None for s in (data.train, data.valid, data.test)):
        raise DatasetError("SASRec needs the history column; load the data with max_history set")


def setup(data: CFData, cfg: CFConfig) -> tuple[CFModel, torch.optim.Optimizer]:
    """A fresh model (global torch RNG, seeded by the caller) and its Adam optimiser."""
    edges = train_edges(data.train) if cfg.model == "lightgcn" else None
    model = build_model(cfg.model, data.num_users, data.num_items, cfg.dim, edges=edges,
                        lightgcn_layers=cfg.lightgcn_layers, max_history=cfg.max_history,
                        sasrec_blocks=cfg.sasrec_blocks, sasrec_heads=cfg.sasrec_heads,
                        sasrec_dropout=cfg.sasrec_dropout)
    # fused: one kernel over all parameters; 5x faster than the loop on CPU for MF's large tables
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return model, opt


def _batch(split: Split, idx: torch.Tensor) -> CFBatch:
    return CFBatch(split.users[idx], split.items[idx], None if split.history is None else split.history[idx])


# ----------------------------------------------------------------------------- train / evaluate
def train_epoch(model: CFModel, opt: torch.optim.Optimizer, split: Split, batch_size: int,
                gen: torch.Generator) -> float:
    """One pass over ``split`` in a random order; returns the mean BCE loss."""
    model.train()
    perm = torch.randperm(len(split), generator=gen)                  # (N,)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(perm), batch_size):
        idx = perm[start:start + batch_size]                           # (B,)
        loss = F.binary_cross_entropy_with_logits(model.score(_batch(split, idx)), split.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    mean = float(total) / len(perm)
    if not np.isfinite(mean):
        raise FloatingPointError(f"training loss became {mean}; lower lr (now {opt.param_groups[0]['lr']})")
    return mean


@torch.no_grad()
def predict(model: CFModel, split: Split, batch_size: int) -> np.ndarray:
    """(N,) float64 logits of every row of ``split``, in eval mode."""
    model.eval()
    out = [model.score(_batch(split, torch.arange(s, min(s + batch_size, len(split)))))
           for s in range(0, len(split), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def evaluate_scores(split: Split, scores: np.ndarray, subsets: bool = False) -> dict:
    """cora.metrics.evaluate of (N,) ``scores`` on a split: auc, uauc, n, ...; with ``subsets`` also
    warm / cold (cold only when the split has cold rows)."""
    cold = split.cold.numpy() if subsets else None
    out = evaluate(split.labels.numpy(), scores, split.users.numpy(), cold=cold)
    if subsets and out["cold"]["n"] == 0:
        del out["cold"]
    return out


def evaluate_split(model: CFModel, split: Split, batch_size: int, subsets: bool = False) -> dict:
    """``evaluate_scores`` of the model's predictions on a split."""
    return evaluate_scores(split, predict(model, split, batch_size), subsets)


# ----------------------------------------------------------------------------- the loop
def _loop(model, opt, data: CFData, cfg: CFConfig, progress: bool):
    """Epochs with early stopping; returns (best state, best epoch, per-epoch log)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    best_auc, best_epoch, best_state, log = -1.0, 0, None, []
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"train-cf {cfg.model}", unit="epoch",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, data.train, cfg.batch_size, gen)
        t1 = time.perf_counter()
        valid = evaluate_split(model, data.valid, cfg.eval_batch_size)
        log.append({"epoch": epoch, "loss": loss, "valid_auc": valid["auc"], "valid_uauc": valid["uauc"],
                    "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1})
        if valid["auc"] > best_auc:
            best_auc, best_epoch = valid["auc"], epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.4f}", valid_auc=f"{valid['auc']:.4f}", best=f"{best_auc:.4f}@{best_epoch}")
        if epoch >= cfg.min_epochs and epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    return best_state, best_epoch, log


def fit_cf(data: CFData, cfg: CFConfig, progress: bool = True) -> FitResult:
    """Train on ``data`` in memory; the returned model holds the best valid-AUC state.

    Seeds with ``cfg.seed`` inside a forked RNG, so the caller's global torch RNG is left as it was.
    """
    check_data(data, cfg)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, opt = setup(data, cfg)
            best_state, best_epoch, log = _loop(model, opt, data, cfg, progress)
        model.load_state_dict(best_state)
        valid = evaluate_split(model, data.valid, cfg.eval_batch_size)
        test_scores = predict(model, data.test, cfg.eval_batch_size)         # (N_test,)
        test = evaluate_scores(data.test, test_scores, subsets=True)
    finally:
        torch.set_num_threads(threads)
    epochs_run = len(log)
    warnings = []
    if best_epoch == 1 and epochs_run > 1:
        warnings.append(f"the best valid AUC ({log[0]['valid_auc']:.4f}) was that of epoch 1: {epochs_run - 1} more "
                        f"epochs did not improve on it, so the model kept is barely trained; check --lr "
                        f"(now {cfg.lr}) and the validation split's size ({len(data.valid)} rows), or raise "
                        f"--min-epochs (now {cfg.min_epochs})")
    for w in warnings:
        print(f"train-cf: warning: {w}", file=sys.stderr)
    metrics = {"model": cfg.model, "valid": valid, "test": test, "best_epoch": best_epoch,
               "epochs_run": epochs_run, "max_epochs": cfg.max_epochs,
               "stopped_early": epochs_run < cfg.max_epochs, "min_epochs": cfg.min_epochs, "warnings": warnings,
               "seconds": time.perf_counter() - start,
               "train_seconds_per_epoch": float(np.mean([e["train_seconds"] for e in log])),
               "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test),
               "num_users": data.num_users, "num_items": data.num_items, "dim": cfg.dim, "epochs": log}
    return FitResult(model, metrics, log, test_scores)


# ----------------------------------------------------------------------------- tables
@torch.no_grad()
def sasrec_user_histories(train: Split, num_users: int, max_history: int) -> torch.Tensor:
    """(n_users, L) each user's positive items at the end of the train split, most recent last:
    the history of the user's last train row plus that row's item when it is positive. Users
    without train rows get an all-padding history."""
    order = np.lexsort((np.arange(len(train)), train.timestamps.numpy(), train.users.numpy()))
    users = train.users.numpy()[order]
    last = order[np.r_[users[1:] != users[:-1], True]]                 # last train row of each user
    last = torch.from_numpy(last)
    hist = train.history[last]                                         # (U', L)
    shifted = torch.cat([hist[:, 1:], train.items[last, None]], 1)     # (U', L) with the row's item
    pos = (train.labels[last] > 0.5)[:, None]                          # (U', 1)
    out = torch.full((num_users, max_history), HISTORY_PAD, dtype=torch.int64)
    out[train.users[last]] = torch.where(pos, shifted, hist)
    return out


@torch.no_grad()
def user_table(model: CFModel, data: CFData, batch_size: int) -> torch.Tensor:
    """(n_users, d) the user vectors written to user_embeddings.parquet.

    MF / LightGCN: the (propagated) table. SASRec: the vector of each user's history at the end of
    the train split (train only, so that the table cannot carry valid/test labels); a server should
    compute SASRec vectors per sample from the sample's history with ``user_vectors_from_history``.
    """
    model.eval()
    if model.name != "sasrec":
        return model.user_table().detach()
    hist = sasrec_user_histories(data.train, data.num_users, model.max_history)   # (U, L)
    return torch.cat([model.user_vectors_from_history(hist[s:s + batch_size])
                      for s in range(0, len(hist), batch_size)])


# ----------------------------------------------------------------------------- save / load
def read_test_sample_ids(data_dir: Path, n_rows: int) -> np.ndarray:
    """(N_test,) int64 sample_id column of DATA_DIR/test.parquet, in file order."""
    path = data_dir / "test.parquet"
    if "sample_id" not in pq.read_schema(path).names:
        raise DatasetError(f"{path} lacks column 'sample_id'; expected the INTERACTIONS schema: prepare the "
                           f"data again")
    ids = pq.read_table(path, columns=["sample_id"]).column("sample_id")
    if ids.null_count or len(ids) != n_rows:
        raise DatasetError(f"{path}: sample_id has {len(ids)} values ({ids.null_count} null) for {n_rows} "
                           f"rows; every row needs one: prepare the data again")
    return ids.to_numpy().astype(np.int64)


def _write_run(tmp: Path, result: FitResult, users: torch.Tensor, cfg: CFConfig, data: CFData,
               identity: dict, sample_ids: np.ndarray) -> None:
    """Every file of CF_DIR into ``tmp``; cf.json last, with the sha256 of the others."""
    model = result.model
    (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    test = data.test
    pq.write_table(store.predictions_table(sample_ids, test.users.numpy(), test.items.numpy(),
                                           test.labels.numpy(), result.test_scores),
                   tmp / "test_predictions.parquet")
    items = model.item_vectors().detach()
    pq.write_table(store.embedding_table("user", users.float().numpy()), tmp / "user_embeddings.parquet")
    pq.write_table(store.embedding_table("item", items.float().numpy()), tmp / "item_embeddings.parquet")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": store.CF_FORMAT, "model": cfg.model})
    os.chmod(tmp / "model.safetensors", 0o644)       # safetensors creates it owner-only; readers may differ
    meta = {"format": store.CF_FORMAT, "format_version": store.CF_FORMAT_VERSION, "model": cfg.model,
            "config": asdict(cfg), "dim": cfg.dim, "num_users": data.num_users, "num_items": data.num_items,
            "history_pad": HISTORY_PAD, "max_history": cfg.max_history, "dataset": identity,
            "files_version": FILES_VERSION,
            "files": {name: file_entry(tmp / name) for name in store.FILES if name != "cf.json"}}
    (tmp / "cf.json").write_text(json.dumps(meta, indent=2) + "\n")


def train_cf(data_dir: str | Path, out_dir: str | Path, cfg: CFConfig | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Train ``cfg.model`` on DATA_DIR and write CF_DIR (see cora.cf.store); returns metrics.json.

    An existing non-empty ``out_dir`` holding a different run (other config or dataset) is refused
    unless ``overwrite``; the same run is trained again and replaced.
    """
    cfg = cfg or CFConfig()
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "CFConfig")
    out_dir = Path(out_dir)
    data, manifest = load_data(data_dir, cfg.max_history if cfg.model == "sasrec" else None)
    identity = store.dataset_identity(data_dir, manifest)
    sample_ids = read_test_sample_ids(Path(data_dir), len(data.test))
    store.check_out_dir(out_dir, asdict(cfg), identity, overwrite)     # fail before training
    result = fit_cf(data, cfg, progress=progress)
    users = user_table(result.model, data, cfg.eval_batch_size)
    store.check_out_dir(out_dir, asdict(cfg), identity, overwrite)     # nothing appeared meanwhile
    store.write_atomically(out_dir, lambda tmp: _write_run(tmp, result, users, cfg, data, identity, sample_ids))
    return result.metrics


def load_cf(cf_dir: str | Path) -> tuple[CFModel, CFConfig]:
    """(model in eval mode, its config) rebuilt from cf.json + model.safetensors alone."""
    cf_dir = Path(cf_dir)
    meta = store.read_meta(cf_dir)
    cfg = CFConfig.from_dict(meta["config"], source=str(cf_dir / "cf.json"))
    state = load_file(str(store.verify_file(cf_dir, meta, "model.safetensors")))
    with torch.random.fork_rng(devices=[]):      # initial values are overwritten; keep the caller's RNG
        model = build_model(cfg.model, meta["num_users"], meta["num_items"], cfg.dim, edges=state.get("edges"),
                            lightgcn_layers=cfg.lightgcn_layers, max_history=cfg.max_history,
                            sasrec_blocks=cfg.sasrec_blocks, sasrec_heads=cfg.sasrec_heads,
                            sasrec_dropout=cfg.sasrec_dropout)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg
