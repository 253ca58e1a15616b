"""Seconds per training epoch of the CF models (cora.cf) on synthetic interactions, on this machine.

    python benchmarks/cf.py --json

Data (in memory, no `cora prepare`): N interactions of random (user, item) pairs among U users and
I items, labels from planted factors, random histories of 0..25 earlier items (timing does not
depend on their content). Each model runs its real training step (``cora.cf.train.train_epoch``:
forward, BCE, backward, fused Adam) at dim 256, batch 2048:

  mf        one full epoch over all N = 1,000,000 rows (plus one valid evaluation, timed apart)
  lightgcn  one full epoch over the first --small rows (default 100,000), same U and I, and an
            estimate for N from --probe-steps timed steps on the full set (steps x time per step)
  sasrec    the same as lightgcn

LightGCN propagates the whole (U + I, d) table every step, so its step cost hardly depends on the
batch; SASRec runs a 2-block transformer over 25 positions per row, so its cost is linear in N.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cora.cf.data import CFData, Split  # noqa: E402
from cora.cf.models import HISTORY_PAD  # noqa: E402
from cora.cf.train import CFConfig, evaluate_split, setup, train_epoch  # noqa: E402


def synthetic(n: int, users: int, items: int, n_eval: int, max_history: int, seed: int = 0) -> CFData:
    """Planted labels (k = 8 factors), random histories; valid and test have ``n_eval`` rows each."""
    rng = np.random.default_rng(seed)
    uf, vf = rng.standard_normal((users, 8), np.float32), rng.standard_normal((items, 8), np.float32)

    def split(rows: int) -> Split:
        u, i = rng.integers(0, users, rows), rng.integers(0, items, rows)
        y = ((uf[u] * vf[i]).sum(1) + 0.5 * rng.standard_normal(rows) > 0).astype(np.float32)
        hist = rng.integers(0, items, (rows, max_history))                         # (N, L)
        lens = rng.integers(0, max_history + 1, rows)
        hist[np.arange(max_history)[None, :] < (max_history - lens)[:, None]] = HISTORY_PAD
        return Split(torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(y),
                     torch.arange(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.bool),
                     torch.from_numpy(hist))
    return CFData(users, items, split(n), split(n_eval), split(n_eval))


def _subset(data: CFData, rows: int) -> CFData:
    return CFData(data.num_users, data.num_items, data.train.take(torch.arange(min(rows, len(data.train)))),
                  data.valid, data.test)


def time_epoch(data: CFData, cfg: CFConfig) -> dict:
    """One full training epoch, then one valid evaluation, timed separately."""
    torch.manual_seed(cfg.seed)
    model, opt = setup(data, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    loss = train_epoch(model, opt, data.train, cfg.batch_size, gen)
    t1 = time.perf_counter()
    valid = evaluate_split(model, data.valid, cfg.eval_batch_size)
    return {"n_train": len(data.train), "steps": math.ceil(len(data.train) / cfg.batch_size),
            "epoch_seconds": round(t1 - t0, 2), "valid_eval_seconds": round(time.perf_counter() - t1, 2),
            "n_valid": len(data.valid), "loss": round(loss, 4), "valid_auc_after_1_epoch": round(valid["auc"], 4)}


def estimate_epoch(data: CFData, cfg: CFConfig, steps: int) -> dict:
    """Time ``steps`` training steps on the full set (after one warm-up step) and scale to an epoch."""
    torch.manual_seed(cfg.seed)
    model, opt = setup(data, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_epoch(model, opt, data.train.take(torch.arange(cfg.batch_size)), cfg.batch_size, gen)   # warm-up
    part = data.train.take(torch.arange(steps * cfg.batch_size))
    t0 = time.perf_counter()
    train_epoch(model, opt, part, cfg.batch_size, gen)
    per_step = (time.perf_counter() - t0) / steps
    epoch_steps = math.ceil(len(data.train) / cfg.batch_size)
    return {"n_train": len(data.train), "steps_timed": steps, "seconds_per_step": round(per_step, 3),
            "estimated_epoch_seconds": round(per_step * epoch_steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--n", type=int, default=1_000_000, help="training interactions")
    ap.add_argument("--users", type=int, default=60_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--small", type=int, default=100_000, help="rows for the LightGCN/SASRec full epoch")
    ap.add_argument("--probe-steps", type=int, default=5, help="steps timed on the full set for the estimate")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--models", default="mf,lightgcn,sasrec")
    args = ap.parse_args()
    data = synthetic(args.n, args.users, args.items, n_eval=20_000, max_history=25)
    out = {"benchmark": "cf", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "data": {"n_train": args.n, "num_users": args.users, "num_items": args.items},
           "dim": args.dim, "batch_size": args.batch_size}
    for name in args.models.split(","):
        cfg = CFConfig(model=name, dim=args.dim, batch_size=args.batch_size)
        if name == "mf":
            out[name] = time_epoch(data, cfg)
        else:
            out[name] = {"small": time_epoch(_subset(data, args.small), cfg),
                         "full_estimate": estimate_epoch(data, cfg, args.probe_steps)}
        if not args.json:
            print(f"{name}: {out[name]}", file=sys.stderr)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
