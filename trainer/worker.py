"""The per-worker training function run by Ray Train's TorchTrainer (one process per rank).

Life cycle: ``setup`` (accelerator, process group, partitioned LLM, CoRA model, engine) ->
``start_state`` (restore the newest committed checkpoint, or score the no-injection baseline) -> per
epoch: ``train_epoch`` (batches from this rank's InteractionShard actor from its cursor,
forward/backward/step, a checkpoint every ``checkpoint.every_steps``) -> ``end_epoch`` (``validate``:
AUC/UAUC over all ranks, on a better valid AUC test metrics and the exported adapter, early stop
after ``patience`` evaluations without improvement; then a checkpoint) -> ``write_metrics``
(RUN/metrics.json). ``Board`` is rank 0's TensorBoard and progress bar. After a failure Ray Train
calls ``train_loop`` again in a new worker group, which resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def to_batch(b: dict):
    from cora.scoring import Batch
    return Batch(*(torch.tensor(b[k]) for k in ("input_ids", "lengths", "user_emb", "item_emb", "labels")))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the real samples of the batch (padding samples have weight 0)."""
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per * weights).sum() / weights.sum().clamp(min=1.0)


def train_step(engine, raw: dict) -> dict:
    """One forward/backward/optimiser step; the record holds the loss and the time of each phase."""
    t0 = time.perf_counter()
    batch = to_batch(raw)
    logits = engine(batch)
    loss = weighted_loss(logits, batch.labels, torch.tensor(raw["weights"]))
    t1 = time.perf_counter()
    engine.backward(loss)
    t2 = time.perf_counter()
    engine.step()
    t3 = time.perf_counter()
    norm = engine.get_global_grad_norm()
    return {"loss": float(loss.detach()), "finite": bool(torch.isfinite(logits).all()), "forward": t1 - t0,
            "backward": t2 - t1, "optimizer": t3 - t2, "seconds": t3 - t0, "lr": float(engine.get_lr()[0]),
            "grad_norm": None if norm is None else float(norm)}


class Board:
    """Rank 0's TensorBoard scalars and progress bar (no-ops elsewhere or when switched off)."""

    def __init__(self, config: dict, rank: int):
        self.on = rank == 0 and bool(config.get("run_dir"))
        self.writer = self.bar = None
        if self.on and config.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(config["run_dir"], "tensorboard")))
        self.progress = self.on and config.get("progress")
        self.world = 1
        self.auc = float("nan")

    def start_epoch(self, epoch: int, steps: int) -> None:
        import torch.distributed as dist
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.progress:
            import sys

            from tqdm import tqdm
            if self.bar is not None:
                self.bar.close()
            # Ray forwards every flush as a log line: redraw at most every 5 s
            self.bar = tqdm(total=steps, desc=f"epoch {epoch}", file=sys.stderr, unit="step", mininterval=5.0)

    def step(self, n: int, r: dict, raw: dict) -> None:
        if not self.on:
            return
        samples, tokens = r["samples"] * self.world, r["tokens"] * self.world
        step_time = r["seconds"] + r["data_wait"]
        if self.writer is not None:
            scalars = {"train/loss": r["loss"], "train/lr": r["lr"], "perf/samples_per_s": samples / step_time,
                       "perf/tokens_per_s": tokens / step_time, "time/data_wait_s": r["data_wait"],
                       "time/forward_s": r["forward"], "time/backward_s": r["backward"],
                       "time/optimizer_s": r["optimizer"], "time/embedding_lookup_s": float(raw["lookup_s"])}
            if r["grad_norm"] is not None:
                scalars["train/grad_norm"] = r["grad_norm"]
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, n)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", valid_auc=f"{self.auc:.4f}",
                                 samples_s=f"{samples / step_time:.1f}", refresh=False)   # redraw at mininterval
            self.bar.update(1)

    def evaluation(self, n: int, e: dict) -> None:
        self.auc = e["valid_auc"]
        if self.writer is not None:
            self.writer.add_scalar("valid/auc", e["valid_auc"], n)
            self.writer.add_scalar("valid/uauc", e["valid_uauc"], n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def logs_to_stderr() -> None:
    """Ray forwards a worker's stdout to the driver's stdout, where `cora train` prints its JSON result:
    this worker process writes its logs (its own, DeepSpeed's) to stderr instead."""
    import logging
    import sys
    sys.stdout = sys.stderr
    from deepspeed.utils import logger
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def setup(config: dict):
    from trainer.engine import select_accelerator
    select_accelerator(config.get("device", "cpu"))
    logs_to_stderr()
    import deepspeed
    import ray.train

    from cora.generator import GeneratorConfig
    from cora.injection import InjectionConfig
    from cora.llm import LLMConfig, resolve_answer_token
    from cora.optim import OptimConfig
    from cora.scoring import CoRAModel
    from trainer import engine as eng

    import warnings
    # DeepSpeed 0.19.8 calls torch.distributed's deprecated collective names on every step
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*is deprecated",
                            category=FutureWarning)
    ctx = ray.train.get_context()
    torch.set_num_threads(config.get("cpus_per_worker", 1))   # the CPUs Ray reserved for this worker
    deepspeed.init_distributed(dist_backend=config.get("backend", "gloo"))
    torch.manual_seed(config.get("seed", 0))
    ecfg = eng.EngineConfig(**config.get("engine", {}))
    ds = eng.ds_config(ecfg, ctx.get_world_size())
    llm, tok = eng.build_partitioned_llm(LLMConfig(**config["llm"]), ds)
    if ecfg.activation_checkpointing:     # recompute the LLM's activations in backward (non-reentrant)
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    yes = resolve_answer_token(tok)
    answer = eng.gathered_answer_row(llm, yes)
    model = CoRAModel(llm, yes, config["cf_dim"], config["cf_dim"], InjectionConfig(**config.get("injection", {})),
                      GeneratorConfig(**config.get("generator", {})), answer_weight=answer)
    engine, _, _ = eng.initialize(model, ds, OptimConfig(**config.get("optim", {})), config.get("total_steps", 100))
    return ctx, engine, model


def train_loop(config: dict) -> None:
    """Ray Train entry point. ``config['actors']``: one InteractionShard handle per rank. Also the
    restart point after a failure: the newest committed checkpoint (if any) is restored first."""
    import ray.train
    import torch.distributed as dist

    from trainer.engine import partition_stats
    ctx, engine, model = setup(config)
    rank = ctx.get_world_rank()
    frozen = [p for p in model.llm.parameters() if not p.requires_grad]     # the LLM's own weights (not P)
    probe = config.get("probe")              # tests: called with (stage, rank, model) after set-up and at the end
    if probe is not None:
        probe("setup", rank, model)
    ckpt = None
    if config.get("checkpoint"):
        from trainer.checkpoint import Checkpointer
        ckpt = Checkpointer(config, rank)
    state, cursor = start_state(config, engine, model, rank, ckpt)
    board, log = Board(config, rank), []
    for epoch in range(state["epoch"], config.get("epochs", 1)):
        if state["stopped"] or out_of_steps(config, state):
            break
        cut = train_epoch(config, engine, rank, epoch, state, cursor, ckpt, board, log)
        cursor = None
        end_epoch(config, engine, model, rank, epoch, state, ckpt, board, cut)
    commits = ckpt.close() if ckpt is not None else []
    board.close()
    nodes: list = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0 and config.get("run_dir"):
        write_metrics(config, state, nodes)
    out = {"rank": rank, "world_size": ctx.get_world_size(), "llm_partition": partition_stats(frozen),
           "activation_checkpointing": bool(model.llm.is_activation_checkpointing),
           "resumed_from": state.get("resumed_from"), "memory": peak_memory(), "log": log,
           "trainable_bytes": sum(p.ds_numel * 4 for p in model.parameters() if p.requires_grad),   # fp32
           "checkpoints": {"commits": [vars(c) for c in commits],
                           "save_seconds": ckpt.save_seconds if ckpt is not None else []}}
    if probe is not None:
        probe("end", rank, model)
    if config.get("report_dir"):
        Path(config["report_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"loss": log[-1]["loss"] if log else math.nan, "steps": state["step"]})


def start_state(config: dict, engine, model, rank: int, ckpt) -> tuple[dict, dict | None]:
    """(loop state, this rank's data cursor): restored from the newest committed checkpoint, or fresh
    (then with the no-injection baseline scored, when asked)."""
    state = {"step": 0, "epoch": 0, "stopped": False, "best_auc": -1.0, "best": None, "stale": 0, "evals": [],
             "no_injection": None}
    restored = ckpt.restore(engine, model) if ckpt is not None else None
    if restored is not None:
        state.update(restored["loop"], resumed_from=restored["name"])
        return state, restored["cursors"][rank]
    if config.get("eval_baseline") and config.get("test_actors"):
        from trainer.evaluate import evaluate                 # P starts at zero: this is the frozen LLM alone
        state["no_injection"] = evaluate(engine, config["test_actors"][rank])[0]
    return state, None


def out_of_steps(config: dict, state: dict) -> bool:
    return bool(config.get("max_steps")) and state["step"] >= config["max_steps"]


def train_epoch(config: dict, engine, rank: int, epoch: int, state: dict, cursor: dict | None, ckpt, board,
                log: list) -> dict | None:
    """Train on this rank's batches of ``epoch`` (from ``cursor`` when resuming mid-epoch); returns the
    cursor where it stopped when the step budget cut the epoch short, else None."""
    from cluster.client import BatchIterator
    from cluster.plan import Cursor
    it = BatchIterator(config["actors"][rank], epoch, cursor=Cursor.from_dict(cursor) if cursor else None)
    state["epoch"] = epoch
    board.start_epoch(epoch, len(it))
    samples = open(Path(config["sample_log"], f"rank{rank}.jsonl"), "a") if config.get("sample_log") else None
    for raw in it:
        record = train_step(engine, raw)
        state["step"] += 1
        record.update(epoch=epoch, step=state["step"], data_wait=it.waits[-1], sample_ids=raw["sample_ids"].tolist(),
                      samples=float(raw["weights"].sum()), tokens=int(raw["lengths"].sum()))
        if len(log) < config.get("record_batches", 0):     # for comparisons with a 1-process run
            record["batch"] = {k: v.tolist() for k, v in raw.items()}
        log.append(record)
        board.step(state["step"], record, raw)
        if samples is not None:                            # an audit trail: which samples each step trained on
            real = [i for i, w in zip(record["sample_ids"], raw["weights"]) if w > 0]     # not padding
            samples.write(json.dumps({"step": state["step"], "epoch": epoch, "loss": record["loss"],
                                      "sample_ids": real}) + "\n")
            samples.flush()
        budget_spent = out_of_steps(config, state)
        # the epoch's last step is saved by end_epoch, after validating
        if ckpt is not None and ckpt.due(state["step"]) and not (it.exhausted or budget_spent):
            ckpt.save(engine, engine.module, state["step"], state, it.cursor().to_dict())
        if budget_spent and not it.exhausted:
            cut = it.cursor().to_dict()
            break
    else:
        cut = None
    if samples is not None:
        samples.close()
    return cut


def end_epoch(config: dict, engine, model, rank: int, epoch: int, state: dict, ckpt, board,
              cut: dict | None) -> None:
    """Validate (model selection, early stopping), then checkpoint the position: the start of the next
    epoch, or ``cut`` when the step budget ended this one early (a resume with more steps finishes it)."""
    improved = False
    if config.get("valid_actors"):
        state["stopped"] = validate(config, engine, model, rank, epoch, state)
        improved = state["stale"] == 0
        board.evaluation(state["step"], state["evals"][-1])
    state["epoch"] = epoch if cut else epoch + 1
    if ckpt is not None:
        ckpt.save(engine, model, state["step"], state, cut, best=improved,
                  valid_auc=state["evals"][-1]["valid_auc"] if state["evals"] else None)


def write_metrics(config: dict, state: dict, nodes: list[str]) -> None:
    """RUN/metrics.json: the best validation and its test metrics, every evaluation, where ranks ran."""
    best = state["best"]
    summary = {"valid": best["valid"] if best else None, "test": best["test"] if best else None,
               "best_epoch": best["epoch"] if best else None, "evaluations": state["evals"], "steps": state["step"],
               "no_injection_test": state.get("no_injection"), "resumed_from": state.get("resumed_from"),
               "worker_nodes": nodes}
    Path(config["run_dir"]).mkdir(parents=True, exist_ok=True)
    Path(config["run_dir"], "metrics.json").write_text(json.dumps(summary, indent=1))


def peak_memory() -> dict:
    """This process's peak resident memory and, on a GPU, peak allocated device memory (MiB)."""
    import resource
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def validate(config: dict, engine, model, rank: int, epoch: int, state: dict) -> bool:
    """Evaluate valid; on improvement also test, and export the adapter. True = stop early."""
    from trainer.evaluate import evaluate, export_trainable, trainable_state
    valid, _ = evaluate(engine, config["valid_actors"][rank])
    state["evals"].append({"epoch": epoch, "valid_auc": valid["auc"], "valid_uauc": valid["uauc"]})
    if valid["auc"] > state["best_auc"]:
        state["best_auc"], state["stale"] = valid["auc"], 0
        test, preds = evaluate(engine, config["test_actors"][rank]) if config.get("test_actors") else (None, None)
        state["best"] = {"epoch": epoch, "valid": valid, "test": test}
        weights = trainable_state(model)                         # collective: every rank gathers
        if rank == 0 and config.get("run_dir"):
            keys = ("llm", "injection", "generator", "cf_dim")
            export_trainable(weights, Path(config["run_dir"], "export"), {k: config.get(k, {}) for k in keys})
            if preds is not None:
                import pyarrow as pa
                import pyarrow.parquet as pq
                pq.write_table(pa.table(preds), Path(config["run_dir"], "test_predictions.parquet"))
        return False
    state["stale"] += 1
    return state["stale"] >= config.get("patience", 3)


def run(config: dict, num_workers: int, storage_path: str, name: str = "cora", max_failures: int = 0):
    """Start the worker group (gloo on CPU, NCCL on GPU per ``config['device']``) and train; after a
    failure Ray Train starts a new group (up to ``max_failures`` times), which resumes from the newest
    committed checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cora.fileio import storage_env
    gpu = config.get("device") == "cuda"
    trainer = TorchTrainer(train_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                                        resources_per_worker={"CPU": config.get("cpus_per_worker", 1)}),
                           torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                           run_config=RunConfig(storage_path=storage_path, name=name,
                                                failure_config=FailureConfig(max_failures=max_failures),
                                                worker_runtime_env={"env_vars": storage_env()}))
    return trainer.fit()
