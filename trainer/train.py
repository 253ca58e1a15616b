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
from cora.fileio import exists, is_remote, join, location, read_bytes, read_parquet, write_bytes

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


def start_data(cfg: TrainConfig, cf_dim: int, cf_model: str, evaluate: bool = True) -> tuple[dict, object]:
    """(one InteractionShard per rank for train, valid and test; the EmbeddingClient of the servers).
    Train batches hold engine.micro_batch_size samples, valid and test batches data.eval_batch_size.
    ``evaluate=False``: the train split only (no validation, test or baseline: cora scale's points)."""
    from cluster.embeddings import start_embedding_servers
    from cluster.interactions import loaded, start_interaction_shards
    from cora.llm import PRESETS, REAL_PRESETS           # presets all use the SmolLM2 tokenizer
    from cora.methods import make_method
    method = make_method(to_dict(cfg))
    sasrec = cf_model == "sasrec"
    client = start_embedding_servers(cfg.data.cf_dir, shards=cfg.data.embedding_shards, dim=cf_dim,
                                     num_cpus=0.1, sasrec=sasrec)
    common = {"embeddings": client, "seed": cfg.run.seed, "num_cpus": 0.1, "max_history": cfg.data.max_history,
              "max_length": cfg.data.max_length, "prefetch": cfg.data.prefetch, "sasrec_history": 25 if sasrec else 0,
              "tokenizer": "smollm2" if cfg.llm.name in PRESETS or cfg.llm.name in REAL_PRESETS else cfg.llm.name,
              "template": method.template, "history_items": method.history_items,
              "bucket_window": cfg.data.bucket_window, "pad_multiple": cfg.data.pad_multiple}
    # The tokenizer cached on this node before its actors start: else each of them, on a node without the
    # cache, reads the GGUF file itself, importing torch and transformers' model code (measured: 30 s each,
    # 7 at once on 2 cores). Actors on other nodes still build their node's cache once.
    if common["tokenizer"] == "smollm2":
        from cora.tokenizer import smollm2_tokenizer_dir
        smollm2_tokenizer_dir()
    from cora.data.schema import read_manifest
    micro = cfg.engine.micro_batch_size
    batch = {"train": micro, "valid": cfg.data.eval_batch(micro), "test": cfg.data.eval_batch(micro)}
    if "rank" in read_manifest(cfg.data.data_dir)["shards"]:       # prepared with --rank-negatives
        batch["rank"] = cfg.data.eval_batch(micro)
    if not evaluate:
        batch = {"train": micro}
    actors = {split: start_interaction_shards(cfg.data.data_dir, split, cfg.run.workers, batch_size=batch[split],
                                              wait=False, **common) for split in batch}
    try:
        loaded([a for group in actors.values() for a in group])   # all splits' actors start side by side
    except BaseException:
        stop_data(actors, client)
        raise
    return actors, client


def handover(cfg: TrainConfig, actors: dict, cf_dim: int, hooks: list | None = None, mirror_key: str = "run",
             store=None):
    """What the workers get besides the config: the actors, the CF width, the schedule's length, where to write
    (and ``hooks``, trainer.hooks objects that look into the workers: cora scale's measurements; ``store``: BDLM's
    shared store)."""
    from cluster.interactions import split_shards
    from cora.data.schema import read_manifest

    from .recipe import Handover
    from .schedule import run_steps
    _, sizes = split_shards(read_manifest(cfg.data.data_dir), cfg.data.data_dir, "train")
    saved = resume_point(cfg)
    run_dir = location(cfg.run.run_dir)
    return Handover(train=actors["train"], valid=actors.get("valid", []), test=actors.get("test", []),
                    rank=actors.get("rank", []),
                    cf_dim=cf_dim, items=item_inputs(cfg),
                    total_steps=run_steps(cfg, sizes, saved[1] if saved else None), run_dir=run_dir,
                    resume_from=saved[0] if saved else None, mirror_key=mirror_key,
                    checkpoint_uri=checkpoint_uri(cfg),
                    staging_dir=None if is_remote(run_dir) else str(Path(run_dir, ".staging")), hooks=list(hooks or []),
                    store=store)


def resume_point(cfg: TrainConfig) -> tuple[str, dict] | None:
    """(name, state.json) of the checkpoint run.resume=auto will continue from (None: a fresh start); says on
    stderr what an elastic resume (another run.workers than the checkpoint's) does to the data and the batch."""
    from .checkpoint import newest_state
    saved = newest_state(checkpoint_uri(cfg)) if cfg.run.resume == "auto" else None
    if saved is not None and saved[1]["world_size"] != cfg.run.workers:
        print(f"[train] {elastic_summary(cfg, saved[0], saved[1])}", file=sys.stderr)
    return saved


def elastic_summary(cfg: TrainConfig, name: str, state: dict) -> str:
    """One line: how a checkpoint of W_0 workers continues on run.workers (data and global batch)."""
    w0, w, e, loop = state["world_size"], cfg.run.workers, cfg.engine, state["loop"]
    cursors = state["cursors"]
    where = (f"epoch {loop['epoch']} starts on {w} ranks" if cursors[0] is None else
             f"the samples of epoch {cursors[0]['epoch']} not yet trained are re-planned over {w} ranks, each "
             f"once")
    old, new = e.accumulation(w0), e.accumulation(w)
    if e.global_batch_size is not None:
        batch = (f"engine.global_batch_size={e.global_batch_size} is kept: accumulation {old} -> {new} "
                 f"micro-batches per step")
    else:
        batch = (f"the global batch changes from {e.micro_batch_size * old * w0} to {e.micro_batch_size * new * w} "
                 f"samples per step (micro-batch {e.micro_batch_size} x accumulation {new} x {w} workers; set "
                 f"engine.global_batch_size to keep it)")
    return (f"elastic resume from {name} (saved by {w0} workers) with run.workers={w}: {where}; {batch}; the LR "
            f"schedule continues at step {loop['step']} and its length is recomputed for the steps left")


def item_inputs(cfg: TrainConfig) -> dict | None:
    """Every item's title, prompt domain and CF embedding, for a method that encodes items (Laser); else None."""
    from cora.methods import make_method
    if not make_method(to_dict(cfg)).item_refresh_epochs:
        return None
    from cora.cf.store import read_embeddings
    from cora.data.schema import read_manifest
    from cora.fileio import open_fs
    items = read_parquet(join(cfg.data.data_dir, "items.parquet")).to_pandas()
    domain = read_manifest(cfg.data.data_dir).get("domain")
    fs, path = open_fs(f"{cfg.data.cf_dir.rstrip('/')}/item_embeddings.parquet")
    with fs.open_input_file(path) as f:
        emb = read_embeddings(f)
    domains = items["domain"].tolist() if "domain" in items else [domain] * len(items)
    return {"titles": items["title"].tolist(), "domains": domains, "emb": emb[: len(items)]}


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast instead of waiting forever when the worker group cannot be placed now: its CPUs, and on
    run.device=cuda one GPU per worker."""
    import ray
    if cfg.run.wait_for_resources:
        return
    free = ray.available_resources()
    need = {"CPU": cfg.run.workers * cfg.run.cpus_per_worker}
    if cfg.run.device == "cuda":
        need["GPU"] = cfg.run.workers
        if not ray.cluster_resources().get("GPU"):
            raise ConfigError([f"run.device=cuda but the Ray cluster has no GPU (its resources: "
                               f"{_resources(ray.cluster_resources())}); use run.device=cpu, or join a cluster "
                               f"whose nodes have GPUs (run.address)"], source="cora train")
    short = {k: (n, free.get(k, 0.0)) for k, n in need.items() if free.get(k, 0.0) < n}
    if short:
        raise ConfigError([f"the worker group needs {n:g} {k}s ({cfg.run.workers} workers) but the Ray cluster has "
                           f"{have:g} free; lower run.workers" + (" or run.cpus_per_worker" if k == "CPU" else "")
                           + ", free the cluster, or set run.wait_for_resources=true (an autoscaling cluster)"
                           for k, (n, have) in short.items()], source="cora train")


def _resources(r: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(r.items()) if k in ("CPU", "GPU", "memory")) or "none"


def check_device(cfg: TrainConfig) -> list[str]:
    """run.device=cuda on a new local Ray instance needs one visible GPU per worker on this machine (a
    cluster's GPUs are counted once joined, by check_resources)."""
    if cfg.run.device != "cuda" or cfg.run.address:
        return []
    import torch
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= cfg.run.workers:
        return []
    why = "torch.cuda.is_available() is False" if not have else f"only {have} GPU(s) are visible"
    return [f"run.device=cuda with run.workers={cfg.run.workers} needs {cfg.run.workers} GPU(s) on this machine, "
            f"but {why} (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use "
            f"run.device=cpu, lower run.workers, install a CUDA build of torch, or join a GPU cluster (run.address)"]


RUN_MARKERS = ("config.json", "metrics.json", "export", "checkpoints")


def preflight(cfg: TrainConfig) -> None:
    """Every check that can be made before Ray or a worker starts; all problems raised at once
    (ConfigError). The config is not changed."""
    from cora.data.schema import DatasetError, read_manifest
    from cora.injection import check_targets
    from cora.llm import llm_family
    problems = []
    try:
        family = llm_family(cfg.llm.name)
        try:
            check_targets(family, cfg.injection.targets)
        except ValueError as e:
            problems.append(f"injection.targets: {e}")
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"llm.name: {e}")
    try:
        manifest = read_manifest(cfg.data.data_dir)
        splits = manifest["counts"]["splits"]
        empty = [s for s in ("train", "valid", "test") if splits.get(s, {}).get("rows", 0) < 1]
        if empty:
            have = ", ".join(f"{k}={v.get('rows', 0)}" for k, v in splits.items())
            problems.append(f"data.data_dir: {cfg.data.data_dir} has no rows in split(s) {', '.join(empty)} "
                            f"(it has {have}); "
                            f"prepare it again with a --split rule that fills train, valid and test")
        few = {s: len(files) for s, files in (manifest.get("shards") or {}).items()
               if s not in empty and len(files) < cfg.run.workers}
        if few:                                    # every rank owns whole shard files (cluster.interactions)
            rows = min(splits.get(s, {}).get("rows", 0) for s in few)
            problems.append(f"data.data_dir: {cfg.data.data_dir} has fewer shard files than run.workers="
                            f"{cfg.run.workers} ranks in split(s) {', '.join(f'{s} ({n})' for s, n in few.items())}, "
                            f"so a rank would own none; prepare it again with --samples-per-shard <= "
                            f"{max(1, rows // cfg.run.workers)} (now {manifest.get('samples_per_shard')}), or use "
                            f"fewer workers")
    except DatasetError as e:
        problems.append(f"data.data_dir: {e}")
    if not is_remote(cfg.data.cf_dir):
        missing = [f for f in ("cf.json", "user_embeddings.parquet", "item_embeddings.parquet")
                   if not Path(cfg.data.cf_dir, f).is_file()]
        if missing:
            problems.append(f"data.cf_dir: {cfg.data.cf_dir} lacks {', '.join(missing)}; create it with "
                            f"`cora train-cf --data {cfg.data.data_dir} --out {cfg.data.cf_dir}`")
        elif not is_remote(cfg.data.data_dir):
            from cora.cf.store import trained_elsewhere
            try:
                why = trained_elsewhere(cfg.data.cf_dir, cfg.data.data_dir)
            except DatasetError:
                why = None                  # an unreadable data dir or cf.json is reported above / at start
            if why:
                problems.append(f"data.cf_dir: {why}")
    e = cfg.engine
    if e.global_batch_size is not None:
        per_step = e.micro_batch_size * cfg.run.workers
        if e.global_batch_size % per_step:
            problems.append(f"engine.global_batch_size={e.global_batch_size} is not a multiple of "
                            f"engine.micro_batch_size x run.workers = {e.micro_batch_size} x {cfg.run.workers} = "
                            f"{per_step}; choose a global batch of {per_step * max(1, e.global_batch_size // per_step)} "
                            f"or {per_step * (e.global_batch_size // per_step + 1)}, or change the micro-batch")
    from cora.methods import read_lora
    stages = {"collm": {"collm.lora_from": cfg.collm.lora_from},
              "reccocktail": {f"reccocktail.{k}": getattr(cfg.reccocktail, k) for k in ("base_from", "ingredient_from")}}
    for key, path in stages.get(cfg.method, {}).items():
        try:
            if path:
                read_lora(path, cfg.injection, cfg.llm.name, key=key)
        except ValueError as e:
            problems.append(str(e))
    if cfg.method == "bdlm":
        problems += check_store(cfg)
    problems += check_device(cfg)
    problems += check_run_dir(cfg)
    from cluster.runtime import check_join
    problems += [f"run.address: {p}" for p in check_join(cfg.run.address)]
    if problems:
        raise ConfigError(problems, source="cora train")


def check_store(cfg: TrainConfig) -> list[str]:
    """method=bdlm: the shared store can be cut into bdlm.store_shards id ranges of each table."""
    from cora.data.schema import DatasetError, read_manifest
    try:
        manifest = read_manifest(cfg.data.data_dir)
    except DatasetError:
        return []                                  # reported with data.data_dir
    fewest = min(("users", manifest.get("num_users", 0)), ("items", manifest.get("num_items", 0)), key=lambda x: x[1])
    if cfg.bdlm.store_shards > fewest[1]:
        return [f"bdlm.store_shards={cfg.bdlm.store_shards}: the store cuts each table into that many id ranges, but "
                f"{cfg.data.data_dir} has only {fewest[1]} {fewest[0]}; use bdlm.store_shards <= {fewest[1]}"]
    return []


def checkpoint_uri(cfg: TrainConfig) -> str:
    return cfg.run.checkpoint_uri or join(location(cfg.run.run_dir), "checkpoints")


# what must not change when a run is resumed (the trainable state and the data cursors depend on them)
# (run.workers may change: an elastic resume re-plans the epoch's remaining samples, cluster.plan.regroup)
RESUME_KEYS = ("method", "collm", "reccocktail", "laser", "bdlm", "data.data_dir", "data.cf_dir", "data.max_history",
               "data.max_length", "llm", "injection", "generator", "engine.micro_batch_size",
               "engine.gradient_accumulation", "engine.global_batch_size", "run.seed")


def check_run_dir(cfg: TrainConfig) -> list[str]:
    """The run directory and the checkpoint location: reachable, and holding an earlier run only when
    asked to resume it (with a compatible config) or to overwrite it."""
    from .checkpoint import check_storage, list_checkpoints
    uri, run_dir = checkpoint_uri(cfg), location(cfg.run.run_dir)
    if is_remote(run_dir) and not uri.startswith(run_dir + "/"):
        try:
            check_storage(run_dir)
        except RuntimeError as e:
            return [f"run.run_dir: {str(e).replace('checkpoints', 'the run directory', 1)}"]
    try:
        check_storage(uri)
        found = [m for m in RUN_MARKERS if m != "checkpoints" and exists(join(run_dir, m))]
        if list_checkpoints(uri):
            found.append(f"checkpoints in {uri}")
    except RuntimeError as e:
        return [f"run.checkpoint_uri: {e}"]
    except OSError as e:
        return [f"run.run_dir: cannot read {run_dir} ({type(e).__name__}: {e}); check the URI, the endpoint "
                f"(CORA_S3_ENDPOINT) and this machine's storage credentials"]
    if not found or cfg.run.overwrite:
        return []
    if cfg.run.resume != "auto":
        return [f"run.run_dir: {run_dir} already holds a run ({', '.join(found)}); set run.resume=auto to "
                f"continue it, choose a new run.run_dir, or set run.overwrite=true to replace it"]
    saved = join(run_dir, "config.json")
    try:
        old = flatten(json.loads(read_bytes(saved)))
    except FileNotFoundError:
        return []
    new = flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS)
               and old.get(k) != new.get(k)]
    return [f"run.resume=auto: {k} was {old.get(k)!r} in {saved}, now {new.get(k)!r}; a resumed run must keep it "
            f"(or start a new run.run_dir)" for k in changed]


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def clear_run_dir(cfg: TrainConfig, run_dir: str) -> None:
    """run.overwrite: remove an earlier run's results and checkpoints (nothing else in the directory)."""
    import pyarrow.fs as pafs

    from cora.fileio import open_fs

    from .checkpoint import clear
    clear(checkpoint_uri(cfg))
    fs, root = open_fs(run_dir)
    for m in RUN_MARKERS + ("tensorboard", "ray", "test_predictions.parquet", "rank_predictions.parquet", "samples",
                            ".staging"):
        kind = fs.get_file_info(f"{root}/{m}").type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{m}")
        elif kind == pafs.FileType.File:
            fs.delete_file(f"{root}/{m}")


def train(cfg: TrainConfig, hooks: list | None = None, evaluate: bool = True) -> dict:
    """``cora train``; ``hooks``: trainer.hooks objects in every worker; ``evaluate=False``: train only (no
    validation, test, baseline or export: a measurement such as cora scale's)."""
    from cluster import runtime
    t0 = time.time()
    for key in ("data_dir", "cf_dir"):       # the run's config.json must not depend on the cwd
        setattr(cfg.data, key, location(getattr(cfg.data, key)))
    cfg.run.run_dir = location(cfg.run.run_dir)
    preflight(cfg)
    run_dir = cfg.run.run_dir
    if cfg.run.overwrite:
        clear_run_dir(cfg, run_dir)
    info = runtime.init(cfg.run.address, num_cpus=max(4, cfg.run.workers * cfg.run.cpus_per_worker + 2),
                        dashboard=cfg.run.dashboard)
    dashboard = info.get("dashboard_url") or "not started (run.dashboard=false, or a cluster without one)"
    print(f"[train] Ray dashboard: {dashboard} (jobs, actors, logs, metrics)", file=sys.stderr)
    cf_dim, cf_model = _cf_info(cfg.data.cf_dir)
    from .planner import resolve_auto
    chosen = resolve_auto(cfg, cf_dim)           # before the workers start: every rank gets the same
    if chosen:
        print(f"[train] {chosen}", file=sys.stderr)
    actors, client = start_data(cfg, cf_dim, cf_model, evaluate)
    store = None
    try:
        store = start_method_store(cfg)
        return _train(cfg, actors, cf_dim, run_dir, dashboard, t0, hooks, store)
    finally:                                           # the data actors belong to this run only
        stop_data(actors, client, store)


def start_method_store(cfg: TrainConfig):
    """BDLM's shared store (cluster.store) for method=bdlm, initialised from data.cf_dir; None for the others."""
    if cfg.method != "bdlm":
        return None
    from cluster.store import start_store
    b = cfg.bdlm
    return start_store(cfg.data.cf_dir, cfg.run.workers, shards=b.store_shards, lr=b.store_lr,
                       optimizer=b.store_optimizer)


def stop_data(actors: dict, client, store=None) -> None:
    """Kill this run's InteractionShard, EmbeddingServer (and BDLM's store) actors (their CPUs go back to the
    cluster)."""
    import ray
    handles = [a for split in actors.values() for a in split] + [a for v in client.servers.values() for a in v]
    if store is not None:
        handles += [a for v in store.shards.values() for a in v]
    for handle in handles:
        ray.kill(handle)


def _train(cfg: TrainConfig, actors: dict, cf_dim: int, run_dir: str, dashboard: str, t0: float,
           hooks: list | None = None, store=None) -> dict:
    from .rundir import cache_root, mirror_key
    from .worker import run
    check_resources(cfg)
    write_bytes(join(run_dir, "config.json"), json.dumps(to_dict(cfg), indent=1).encode())
    key = mirror_key(run_dir)             # the workers' local copies of this invocation's run files
    # Ray Train's own bookkeeping (no checkpoints are reported to it): beside the run, or in this node's cache
    ray_dir = cache_root() / f"{key}.ray" if is_remote(run_dir) else Path(run_dir, "ray")
    run(cfg, handover(cfg, actors, cf_dim, hooks, mirror_key=key, store=store), str(ray_dir), name="train",
        max_failures=cfg.run.max_failures)
    if is_remote(run_dir):
        import shutil
        shutil.rmtree(ray_dir, ignore_errors=True)
    metrics = json.loads(read_bytes(join(run_dir, "metrics.json")))
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["llm"] = cfg.llm.name
    board = join(run_dir, "tensorboard")
    print(f"[train] run directory: {run_dir}\n[train] TensorBoard: tensorboard --logdir {board}"
          + (" (or copy it first: the events are synced there from rank 0's local copy)" if is_remote(run_dir) else "")
          + f"\n[train] Ray dashboard: {dashboard}", file=sys.stderr)
    return metrics


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train CoRA with DeepSpeed ZeRO-3 workers on Ray", description=__doc__)
    p.add_argument("--config", required=True, action="append",
                   help="YAML file (see configs/); repeat to layer files, e.g. --config configs/collm-ml1m.yaml "
                        "--config configs/llm/llama-13b.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.epochs=2 llm.name=tiny-qwen2")
    p.set_defaults(func=main)


def main(args) -> int:
    out, sys.stdout = sys.stdout, sys.stderr    # Ray prints forwarded worker/raylet logs to stdout: only the
    try:                                         # JSON result goes there
        return _main(args, out)
    finally:
        sys.stdout = out


def _main(args, out) -> int:
    from ray.train import TrainingFailedError
    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        metrics = train(cfg)
    except ConfigError as e:
        print(f"cora train: {e}", file=sys.stderr)
        return 2
    except TrainingFailedError as e:
        print(f"cora train: error: the worker group failed (run.max_failures={cfg.run.max_failures} restarts "
              f"allowed): {e}\ncora train: the committed checkpoints stay in {checkpoint_uri(cfg)}; continue the "
              f"run with the same command and run.resume=auto", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics.get(k) for k in ("valid", "test", "ranking", "no_injection_test", "best_epoch",
                                               "steps", "seconds", "llm")}, indent=1), file=out)
    return 0
