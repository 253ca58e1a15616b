"""``cora train-cf``: train a CF model on a prepared data directory and write CF_DIR.

    cora train-cf --data DATA_DIR --model mf --out CF_DIR [--dim 256] [--epochs 100] [--patience 5] [--min-epochs 20]
                  [--lr 1e-3] [--batch-size 2048] [--seed 0] [--overwrite] [--no-progress]

Prints metrics.json to stdout; the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from cora.cf.models import MODEL_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-cf`` on an ``add_subparsers()`` object; sets ``func=run``."""
    p = subparsers.add_parser("train-cf", help="train a CF model (MF, LightGCN, SASRec) on a prepared data dir",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="a directory written by `cora prepare`")
    p.add_argument("--model", choices=MODEL_NAMES, default="mf", help="CF model (default: mf)")
    p.add_argument("--out", required=True, metavar="CF_DIR", help="where to write the trained run")
    p.add_argument("--dim", type=int, default=256, help="embedding size (default: 256)")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (default: 100)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better valid AUC before stopping")
    p.add_argument("--min-epochs", type=int, default=20,
                   help="epochs always run before early stopping may stop (default: 20; capped at --epochs)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=2048, help="training batch size (default: 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CF_DIR holding a different run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train per ``args`` and print the metrics JSON; returns 0, or 2 (message on stderr) when the
    arguments, the data directory or the output directory cannot be used."""
    from cora.cf.train import CFConfig, train_cf
    from cora.config import ConfigError
    from cora.data.schema import DatasetError

    try:
        cfg = CFConfig.from_dict({"model": args.model, "dim": args.dim, "max_epochs": args.epochs,
                                  "patience": args.patience, "min_epochs": args.min_epochs, "lr": args.lr, "batch_size": args.batch_size,
                                  "seed": args.seed}, source="train-cf arguments")
        metrics = train_cf(args.data, args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, DatasetError, FileExistsError) as e:
        print(f"cora train-cf: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0
