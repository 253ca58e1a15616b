"""``cora train``: the driver. Starts (or joins) Ray, the EmbeddingServers and the InteractionShard
actors for every split, then the Ray Train worker group, and prints the run's metrics.

    cora train --config configs/demo.yaml [--config more.yaml ...] [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cora.config import ConfigError, load, to_dict

from .config import TrainConfig


def _cf_info(cf_dir: str) -> tuple[int, str]:
    """(embedding dim, CF model name) of a CF_DIR."""
    from cluster.embeddings import table_shape
    from cora.fileio import open_fs
    _, dim = table_shape(f"{cf_dir.rstrip('/')}/user_embeddings.parquet", "user")
    fs, path = open_fs(f"{cf_dir.rstrip('/')}/cf.json")
    with fs.open_input_stream(path) as f:
        model = json.loads(f.read()).get("config", {}).get("model", "mf")
    return dim, model


def start_data(cfg: TrainConfig, cf_dim: int, cf_model: str) -> dict:
    """EmbeddingServers and one InteractionShard per rank for train, valid and test."""
    from cluster.embeddings import start_embedding_servers
    from cluster.interactions import start_interaction_shards
    from cora.llm import PRESETS, REAL_PRESETS           # presets all use the SmolLM2 tokenizer
    sasrec = cf_model == "sasrec"
    client = start_embedding_servers(cfg.data.cf_dir, shards=cfg.data.embedding_shards, dim=cf_dim,
                                     num_cpus=0.1, sasrec=sasrec)
    common = {"embeddings": client, "batch_size": cfg.engine.micro_batch_size, "seed": cfg.run.seed,
              "num_cpus": 0.1, "max_history": cfg.data.max_history, "max_length": cfg.data.max_length,
              "prefetch": cfg.data.prefetch, "sasrec_history": 25 if sasrec else 0,
              "tokenizer": "smollm2" if cfg.llm.name in PRESETS or cfg.llm.name in REAL_PRESETS else cfg.llm.name}
    return {split: start_interaction_shards(cfg.data.data_dir, split, cfg.run.workers, **common)
            for split in ("train", "valid", "test")}


def worker_config(cfg: TrainConfig, actors: dict, cf_dim: int) -> dict:
    from cluster import plan
    from cora.data.schema import read_manifest
    rows = read_manifest(cfg.data.data_dir)["counts"]["splits"]["train"]["rows"]
    steps = plan.steps_per_epoch(rows, cfg.run.workers, cfg.engine.micro_batch_size) * cfg.run.epochs
    d = to_dict(cfg)
    return {"llm": d["llm"], "injection": d["injection"], "generator": d["generator"], "optim": d["optim"],
            "engine": d["engine"], "cf_dim": cf_dim, "device": cfg.run.device, "seed": cfg.run.seed,
            "epochs": cfg.run.epochs, "patience": cfg.run.patience, "max_steps": cfg.run.max_steps,
            "total_steps": max(1, steps // cfg.engine.gradient_accumulation), "run_dir": str(Path(cfg.run.run_dir).absolute()),
            "cpus_per_worker": cfg.run.cpus_per_worker, "actors": actors["train"],
            "valid_actors": actors["valid"], "test_actors": actors["test"], "tensorboard": True, "progress": True}


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast instead of waiting forever when the worker group cannot be placed now."""
    import ray
    need = cfg.run.workers * cfg.run.cpus_per_worker
    free = ray.available_resources().get("CPU", 0.0)
    if free < need and not cfg.run.wait_for_resources:
        raise RuntimeError(f"the worker group needs {need} CPUs ({cfg.run.workers} workers x "
                           f"{cfg.run.cpus_per_worker}) but the Ray cluster has {free:g} free; lower run.workers "
                           f"or run.cpus_per_worker, free the cluster, or set run.wait_for_resources=true "
                           f"(an autoscaling cluster)")


def train(cfg: TrainConfig) -> dict:
    from cluster import runtime

    from .worker import run
    from cora.fileio import is_remote
    t0 = time.time()
    for key in ("data_dir", "cf_dir"):       # the run's config.json must not depend on the cwd
        value = getattr(cfg.data, key)
        if not is_remote(value):
            setattr(cfg.data, key, str(Path(value).absolute()))
    info = runtime.init(cfg.run.address, num_cpus=max(4, cfg.run.workers * cfg.run.cpus_per_worker + 2))
    cf_dim, cf_model = _cf_info(cfg.data.cf_dir)
    actors = start_data(cfg, cf_dim, cf_model)
    check_resources(cfg)
    run_dir = Path(cfg.run.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    run(worker_config(cfg, actors, cf_dim), cfg.run.workers, str(run_dir / "ray"), name="train")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["llm"] = cfg.llm.name
    print(f"[train] run directory: {run_dir}\n[train] TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
          f"\n[train] Ray dashboard: {info.get('dashboard_url') or 'not started (run.address or a dashboard-enabled cluster)'}",
          file=sys.stderr)
    return metrics


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train CoRA with DeepSpeed ZeRO-3 workers on Ray", description=__doc__)
    p.add_argument("--config", required=True, action="append",
                   help="YAML file (see configs/); repeat to layer files, e.g. --config configs/collm-ml1m.yaml "
                        "--config configs/llm/llama-13b.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.epochs=2 llm.name=tiny-qwen2")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"cora train: {e}", file=sys.stderr)
        return 2
    metrics = train(cfg)
    print(json.dumps({k: metrics[k] for k in ("valid", "test", "best_epoch", "steps", "seconds", "llm")}, indent=1))
    return 0
