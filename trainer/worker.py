"""The per-worker training function run by Ray Train's TorchTrainer (one process per rank).

Life cycle: ``setup`` (accelerator, process group, partitioned LLM, CoRA model, engine) -> per epoch:
train (batches from this rank's InteractionShard actor, forward/backward/step, weighted loss) ->
``validate`` (AUC/UAUC over all ranks; on a better valid AUC: test metrics and the exported adapter;
early stop after ``patience`` evaluations without improvement) -> ``metrics.json`` in the run
directory. Checkpoints, TensorBoard and the CLI build on these (next steps).
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
    return {"loss": float(loss), "finite": bool(torch.isfinite(logits).all()), "forward": t1 - t0,
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
        samples = float(raw["weights"].sum()) * self.world
        tokens = float(raw["lengths"].sum()) * self.world
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
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", valid_auc=f"{self.auc:.4f}", samples_s=f"{samples / step_time:.1f}")
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


def setup(config: dict):
    from trainer.engine import select_accelerator
    select_accelerator(config.get("device", "cpu"))
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
    if config.get("dump_llm"):             # tests: the exact weights, for a 1-process reference run
        eng.save_gathered(llm, config["dump_llm"], ctx.get_world_rank() == 0)
    if ecfg.activation_checkpointing:     # recompute the LLM's activations in backward (non-reentrant)
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    yes = resolve_answer_token(tok)
    answer = eng.gathered_answer_row(llm, yes)
    model = CoRAModel(llm, yes, config["cf_dim"], config["cf_dim"], InjectionConfig(**config.get("injection", {})),
                      GeneratorConfig(**config.get("generator", {})), answer_weight=answer)
    engine, _, _ = eng.initialize(model, ds, OptimConfig(**config.get("optim", {})), config.get("total_steps", 100))
    return ctx, engine, model


def train_loop(config: dict) -> None:
    """Ray Train entry point. ``config['actors']``: one InteractionShard handle per rank."""
    import ray.train

    from cluster.client import BatchIterator
    from trainer.engine import partition_stats
    ctx, engine, model = setup(config)
    rank = ctx.get_world_rank()
    frozen = [p for p in model.llm.parameters() if not p.requires_grad]     # the LLM's own weights (not P)
    llm_start = [p.ds_tensor.detach().clone() for p in frozen]
    gen_start = [p.ds_tensor.detach().clone() for p in model.generator.parameters()]
    log, state = [], {"best_auc": -1.0, "best": None, "stale": 0, "evals": []}
    board = Board(config, rank)
    for epoch in range(config.get("epochs", 1)):
        it = BatchIterator(config["actors"][rank], epoch)
        board.start_epoch(epoch, len(it))
        for step, raw in enumerate(it):
            record = train_step(engine, raw)
            record.update(epoch=epoch, step=step, data_wait=it.waits[-1], sample_ids=raw["sample_ids"].tolist())
            if len(log) < config.get("record_batches", 0):     # for comparisons with a 1-process run
                record["batch"] = {k: v.tolist() for k, v in raw.items()}
            log.append(record)
            board.step(len(log), record, raw)
            if config.get("max_steps") and len(log) >= config["max_steps"]:
                break
        stop = bool(config.get("valid_actors")) and validate(config, engine, model, rank, epoch, state)
        if state["evals"]:
            board.evaluation(len(log), state["evals"][-1])
        if stop or (config.get("max_steps") and len(log) >= config["max_steps"]):
            break                                                   # early stop, or the step budget
    board.close()
    if rank == 0 and config.get("run_dir"):
        summary = {"valid": state["best"]["valid"] if state["best"] else None,
                   "test": state["best"]["test"] if state["best"] else None,
                   "best_epoch": state["best"]["epoch"] if state["best"] else None,
                   "evaluations": state["evals"], "steps": len(log)}
        Path(config["run_dir"]).mkdir(parents=True, exist_ok=True)
        Path(config["run_dir"], "metrics.json").write_text(json.dumps(summary, indent=1))
    out = {"rank": rank, "world_size": ctx.get_world_size(), "llm_partition": partition_stats(frozen),
           "activation_checkpointing": bool(model.llm.is_activation_checkpointing),
           "llm_unchanged": all(torch.equal(a, p.ds_tensor) for a, p in zip(llm_start, frozen)),
           "generator_changed": any(not torch.equal(a, p.ds_tensor) for a, p in
                                    zip(gen_start, model.generator.parameters())),
           "log": log}
    if config.get("report_dir"):
        Path(config["report_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"loss": log[-1]["loss"] if log else math.nan, "steps": len(log)})


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


def run(config: dict, num_workers: int, storage_path: str, name: str = "cora"):
    """Start the worker group (gloo on CPU, NCCL on GPU per ``config['device']``) and train."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    gpu = config.get("device") == "cuda"
    trainer = TorchTrainer(train_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                                        resources_per_worker={"CPU": config.get("cpus_per_worker", 1)}),
                           torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                           run_config=RunConfig(storage_path=storage_path, name=name))
    return trainer.fit()
