"""The training recipe every Ray Train worker runs, as a visible life cycle:

    recipe = Recipe(cfg, handover)      # the validated TrainConfig + what the driver hands over
    recipe.setup()                      # accelerator, process group, partitioned LLM, CoRA model, engine
    cursor = recipe.restore()           # the newest committed checkpoint, or a fresh start (+ baseline)
    for each epoch:
        cut = recipe.train_epoch(...)   # this rank's batches from its cursor; a checkpoint every N steps
        recipe.end_epoch(...)           # the method's phase after a whole epoch (BDLM's domain model), evaluate
                                        # (valid; on improvement test + export), then save
    recipe.cleanup()                    # uploads committed, metrics.json, TensorBoard closed

``Recipe.fit`` runs exactly that. After a failure Ray Train calls the worker entry point again in a
new worker group, whose ``restore`` continues from the newest committed checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from cora.config import to_dict

from .config import TrainConfig
from .worker import train_step


@dataclass
class Handover:
    """What the driver hands every worker besides the TrainConfig (actor handles, derived sizes)."""

    train: list
    """One InteractionShard actor per rank for the train split."""
    valid: list = field(default_factory=list)
    """Per rank, for validation (empty: no validation, no early stopping)."""
    test: list = field(default_factory=list)
    """Per rank, for the test split (empty: no test metrics, no baseline)."""
    rank: list = field(default_factory=list)
    """Per rank, for the rank split (test positives with recorded negatives; empty: no ranking metrics)."""
    cf_dim: int = 0
    """Width of the CF user and item embeddings."""
    total_steps: int = 1
    """Optimiser steps of the whole run: the length of the LR schedule."""
    run_dir: str | None = None
    """The run directory, an absolute path or an object-storage URI (metrics.json, TensorBoard, export/); None
    writes none of them."""
    mirror_key: str = "run"
    """Names this invocation's local mirror of an object-storage run directory (trainer.rundir.Mirror)."""
    checkpoint_uri: str | None = None
    """Where checkpoints are committed; None: no checkpoints."""
    resume_from: str | None = None
    """The checkpoint the driver planned the schedule's length from (run.resume=auto), or None."""
    staging_dir: str | None = None
    """Local directory where rank 0 stages a checkpoint before upload (default: .staging in the run
    directory's local mirror, which is RUN itself for a local run directory)."""
    items: dict | None = None
    """For a method that scores against item encodings (Laser): every item's "titles", "domains" (its prompt
    domain) and CF "emb" (n_items, d); None otherwise."""
    hooks: list = field(default_factory=list)
    """trainer.hooks.Hooks installed by tests and benchmarks (none in production)."""
    store: object = None
    """For a method with state outside the engine (BDLM): its service (cluster.store.StoreClient); else None."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (as JSON) and restored on resume."""

    step: int = 0
    epoch: int = 0
    stopped: bool = False
    best_auc: float = -1.0
    best: dict | None = None
    """{"epoch", "valid", "test"} of the best validation so far."""
    stale: int = 0
    """Evaluations since the last improvement (early stopping after run.patience)."""
    evals: list = field(default_factory=list)
    no_injection: dict | None = None
    """Test metrics of the frozen LLM before training (P = 0)."""
    no_injection_ranking: dict | None = None
    """The same model's ranking metrics on the rank split before training (when the data has one)."""
    resumed_from: str | None = None
    samples: float = 0.0
    """Real training samples so far (the padding excluded)."""
    tokens: int = 0
    """This rank's real prompt tokens trained on so far (those of weight-0 padding samples excluded)."""
    padded_tokens: int = 0
    """This rank's padding trained through so far: the (B, T) slots of its micro-batches minus ``tokens``."""
    train_seconds: float = 0.0
    """Seconds in training steps so far (data waits included; evaluation and checkpoints not)."""
    method_evals: list = field(default_factory=list)
    """The method's own record of each finished epoch (``Method.end_epoch``: BDLM's domain model)."""

    @classmethod
    def from_dict(cls, d: dict, **extra) -> "LoopState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**d, **extra}.items() if k in known})


def padding(raw: dict) -> tuple[int, int]:
    """(real tokens, padded slots) of a micro-batch: the prompt tokens of its weight > 0 samples, and the rest
    of its (B, T) input: right padding up to T, and all of a weight-0 padding sample."""
    lengths, weights = np.asarray(raw["lengths"]), np.asarray(raw["weights"])
    real = int(lengths[weights > 0].sum())
    return real, int(np.prod(np.shape(raw["input_ids"]))) - real


def combine(window: list[dict]) -> dict:
    """One optimiser step's record from its micro-batches' records (trainer.worker.train_step's plus the
    data fields): times, samples, tokens and padding summed; the loss averaged over the micro-batches with samples
    (as DeepSpeed averages their gradients); lr and gradient norm of the step."""
    if len(window) == 1:
        return dict(window[0], micro_batches=1)
    real = [r for r in window if r["samples"] > 0] or window
    out = dict(window[-1], micro_batches=len(window), loss=sum(r["loss"] for r in real) / len(real),
               finite=all(r["finite"] for r in window), sample_ids=[i for r in window for i in r["sample_ids"]])
    for k in ("forward", "backward", "optimizer", "seconds", "data_wait", "samples", "tokens", "padded", "lookup_s"):
        out[k] = sum(r[k] for r in window)
    return out


class Recipe:
    def __init__(self, cfg: TrainConfig, handover: Handover):
        self.cfg, self.h = cfg, handover
        self.state = LoopState()
        self.ckpt = None
        self.commits: list = []
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ set-up and restore
    def setup(self) -> None:
        """Accelerator, process group, the LLM partitioned across the ranks, the CoRA model, the engine."""
        from .board import Board, logs_to_stderr
        from .engine import init_distributed, select_accelerator
        select_accelerator(self.cfg.run.device)
        logs_to_stderr()
        import warnings

        import ray.train
        # DeepSpeed 0.19.8 calls torch.distributed's deprecated collective names on every step
        warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*is deprecated",
                                category=FutureWarning)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_ranks = ctx.get_local_world_size()
        torch.set_num_threads(self.cfg.run.cpus_per_worker)       # the CPUs Ray reserved for this worker
        if self.cfg.run.keep_freed_memory:
            from cora.allocator import keep_freed_memory
            if not keep_freed_memory() and self.rank == 0:
                from .checkpoint import _log
                _log("run.keep_freed_memory: this C library is not glibc (or refused mallopt); its allocator is "
                     "left as it is")
        init_distributed(self.cfg.run.device)
        torch.manual_seed(self.cfg.run.seed)
        self.model, self.engine = self._build()
        if self.h.store is not None:
            self.model.method.connect(self.model, self.h.store, self.rank, self.world,
                                      {"data_dir": self.cfg.data.data_dir, "cf_dir": self.cfg.data.cf_dir,
                                       "seed": self.cfg.run.seed})
        self.out = self._mirror()
        if self.h.checkpoint_uri:
            from .checkpoint import Checkpointer
            run = self.cfg.run
            staging = self.h.staging_dir or str(Path(self.out.local if self.out else ".", ".staging"))
            saved = dict(to_dict(self.cfg), cf_dim=self.h.cf_dim)
            if self.h.items:
                saved["num_items"] = len(self.h.items["titles"])
            self.ckpt = Checkpointer(self.h.checkpoint_uri, run.checkpoint_every, run.keep_last, staging, saved,
                                     self.rank)
        self.board = Board(str(self.out.local) if self.out else None, self.rank)
        for hook in self.h.hooks:
            hook.after_setup(self)

    def _mirror(self):
        """Where this rank writes its run files (trainer.rundir): the run directory, or a local mirror of an
        object-storage one; a resumed run's sample log is fetched first (its lines are appended to)."""
        if not self.h.run_dir:
            return None
        from .rundir import Mirror, owned_files
        out = Mirror(self.h.run_dir, owned_files(self.rank), self.h.mirror_key, self.cfg.run.sync_timeout_s)
        if self.cfg.run.sample_log:
            log = f"samples/rank{self.rank}.jsonl"
            if not (out.local / log).exists():       # else: a restarted group on this node, its own copy is newer
                out.pull(log)
            (out.local / "samples").mkdir(parents=True, exist_ok=True)
        return out

    def sync(self, final: bool = False) -> None:
        """Copy this rank's run files to an object-storage run directory (trainer.rundir.Mirror.sync)."""
        if self.out is not None:
            self.board.flush()
            self.out.sync(final=final)

    def _build(self):
        from cora.llm import resolve_answer_token
        from cora.methods import make_method
        from cora.scoring import CoRAModel

        from . import engine as eng
        cfg = self.cfg
        hidden = None
        if cfg.engine.needs_hidden_size:                       # a ZeRO-3 size sized to the model ('auto')
            from .planner import shape_of
            hidden = shape_of(cfg.llm.name).hidden
        local = self.local_ranks
        if cfg.engine.partitioning == "hpz" and cfg.engine.node_ranks == "auto":
            local = eng.node_ranks_agreed(local)
        ds = eng.ds_config(cfg.engine, self.world, hidden, local)
        llm, tok = eng.build_llm(cfg.llm, ds, cfg.engine.partitioning)
        self.tok = tok
        if cfg.engine.activation_checkpointing not in (True, False):
            raise ValueError(f"engine.activation_checkpointing must be true or false here, got "
                             f"{cfg.engine.activation_checkpointing!r} ('auto' is resolved by cora train before the "
                             f"workers start: trainer.planner.resolve_auto)")
        if cfg.engine.activation_checkpointing:     # recompute the LLM's activations in backward (non-reentrant)
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        yes = resolve_answer_token(tok)
        model = CoRAModel(llm, yes, self.h.cf_dim, self.h.cf_dim, cfg.injection, cfg.generator,
                          answer_weight=eng.gathered_answer_row(llm, yes),
                          method=make_method(to_dict(cfg), num_items=len(self.h.items["titles"]) if self.h.items else None))
        engine, _, _ = eng.initialize(model, ds, cfg.optim, self.h.total_steps, leaf_layers=cfg.engine.leaf_layers)
        return model, engine

    def restore(self) -> dict | None:
        """Load the newest committed checkpoint and return this rank's data cursor; or start fresh (then
        score the test split once with P = 0, the no-injection baseline, when asked) and return None."""
        restored = self.ckpt.restore(self.engine, self.model) if self.ckpt is not None else None
        if restored is not None:
            self.state = LoopState.from_dict(restored["loop"], resumed_from=restored["name"])
            return self._cursor(restored)
        self.refresh_items()                      # before anything is scored (a no-op for most methods)
        if self.cfg.run.eval_baseline and self.h.test:
            from .evaluate import evaluate
            self.state.no_injection, untrained = evaluate(self.engine, self.h.test[self.rank])
            self._write_predictions("untrained_test", untrained)     # the run's own baseline, row by row
            if self.h.rank:                       # the same on the paper's ranking protocol, for methods judged by it
                ranks = evaluate(self.engine, self.h.rank[self.rank])[0]
                self.state.no_injection_ranking = dict(ranks["ranking"], auc=ranks["auc"])
        return None

    def _cursor(self, restored: dict) -> dict | None:
        """This rank's data cursor in a restored checkpoint; saved by another number of ranks (an elastic
        resume), the epoch's untrained samples re-planned over this group (``cluster.plan.regroup``)."""
        from cluster.plan import regroup
        saved = restored["world_size"]
        if saved != self.world and self.rank == 0:
            from .checkpoint import _log
            _log(f"{restored['name']} was saved by {saved} workers, this group has {self.world}: the rest of "
                 f"the epoch is re-planned over {self.world} ranks")
            if restored["name"] != self.h.resume_from:
                _log(f"the driver planned the LR schedule from {self.h.resume_from}, not {restored['name']} (a "
                     f"checkpoint staged by the crashed run and committed now): its length is off by the steps "
                     f"between them")
        return regroup(restored["cursors"], self.world)[self.rank]

    def refresh_items(self) -> None:
        """Encode every item with the current weights into ``model.item_table`` (methods that score against
        item encodings, Laser; every rank encodes a share, all ranks get the whole table)."""
        if not self.model.method.item_refresh_epochs:
            return
        from cora.laser import item_batch
        from cora.prompts import domain_encoders

        from .evaluate import encode_items
        items = self.h.items
        domains = sorted(set(items["domains"]))
        encoders = domain_encoders(self.tok, self.model.method.template, domains, self.cfg.data.max_history,
                                   self.cfg.data.max_length)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        table = encode_items(self.engine, lambda ids: item_batch(encoders, items["titles"], items["domains"],
                                                                 items["emb"], ids, pad),
                             len(items["titles"]), self.cfg.data.eval_batch(self.cfg.engine.micro_batch_size))
        with torch.no_grad():
            self.model.item_table.copy_(table.to(self.model.item_table.device))

    # ------------------------------------------------------------------ training
    def out_of_steps(self) -> bool:
        return bool(self.cfg.run.max_steps) and self.state.step >= self.cfg.run.max_steps

    def train_epoch(self, epoch: int, cursor: dict | None) -> dict | None:
        """Train on this rank's batches of ``epoch`` (from ``cursor`` when resuming mid-epoch); returns the
        cursor where it stopped when the step budget cut the epoch short, else None.

        A step is an optimiser step: ``accumulation`` micro-batches (DeepSpeed steps the optimiser on the
        last of them). ``run.max_steps``, ``run.checkpoint_every``, the schedule and TensorBoard all count
        these steps, and the budget and the checkpoints act only at a window's end, so a saved cursor never
        marks as delivered a sample whose gradient is not yet in the weights. An epoch whose micro-batch
        count is not a multiple of the accumulation closes its last window with weight-0 micro-batches
        (no loss, no gradient), so that every epoch ends on an optimiser step."""
        from cluster.client import BatchIterator
        from cluster.plan import Cursor
        it = BatchIterator(self.h.train[self.rank], epoch, cursor=Cursor.from_dict(cursor) if cursor else None)
        self.state.epoch = epoch
        self.board.start_epoch(epoch, -(-len(it) // self.accumulation))
        window: list[dict] = []
        raw = None
        with self._sample_log() as audit:
            for raw in it:
                window.append(self._micro_step(raw, epoch, it.waits[-1], len(window), audit))
                if len(window) < self.accumulation:
                    continue
                self._step_done(window, raw)
                window = []
                budget_spent = self.out_of_steps()
                # the epoch's last step is saved by end_epoch, after evaluating
                if self.ckpt is not None and self.ckpt.due(self.state.step) and not (it.exhausted or budget_spent):
                    self.save(it.cursor().to_dict())
                if budget_spent and not it.exhausted:
                    return it.cursor().to_dict()
            if window:                           # close the epoch's last window with weight-0 micro-batches
                pad = dict(raw, weights=raw["weights"] * 0)
                while len(window) < self.accumulation:
                    window.append(self._micro_step(pad, epoch, 0.0, len(window), audit))
                self._step_done(window, raw)
        return None

    @property
    def accumulation(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def _micro_step(self, raw: dict, epoch: int, wait: float, micro: int, audit) -> dict:
        """One micro-batch's forward and backward (and the optimiser step at a window's end)."""
        record = train_step(self.engine, raw)
        tokens, padded = padding(raw)
        record.update(epoch=epoch, data_wait=wait, sample_ids=raw["sample_ids"].tolist(),
                      samples=float(raw["weights"].sum()), tokens=tokens, padded=padded,
                      lookup_s=float(raw["lookup_s"]))
        if audit is not None:                  # which samples each step trained on (not the padding)
            real = [i for i, w in zip(record["sample_ids"], raw["weights"]) if w > 0]
            audit.write(json.dumps({"step": self.state.step + 1, "micro": micro, "epoch": epoch,
                                    "loss": record["loss"], "lr": record["lr"], "sample_ids": real}) + "\n")
            audit.flush()
        return record

    def _step_done(self, window: list[dict], raw: dict) -> None:
        """An optimiser step is done: its record (the window's micro-batches combined) to TensorBoard and hooks."""
        self.state.step += 1
        self.model.method.after_step(self.model, self.state.step)     # BDLM: the store applies the step
        record = combine(window)
        record["step"] = self.state.step
        self.state.samples += record["samples"]
        self.state.tokens += record["tokens"]
        self.state.padded_tokens += record["padded"]
        self.state.train_seconds += record["seconds"] + record["data_wait"]
        self.last_loss = record["loss"]
        self.board.step(self.state.step, record)
        if self.out is not None and self.out.due():
            self.sync()
        for hook in self.h.hooks:
            hook.after_step(self, record, raw)

    def _sample_log(self):
        if not (self.cfg.run.sample_log and self.out is not None):
            return contextlib.nullcontext()
        return open(Path(self.out.local, "samples", f"rank{self.rank}.jsonl"), "a")

    # ------------------------------------------------------------------ evaluate and save
    def end_epoch(self, epoch: int, cut: dict | None) -> None:
        """After a whole epoch the method's own phase (``Method.end_epoch``: BDLM's domain model, which writes the
        store the LLM then is evaluated and exported with), evaluate, then checkpoint the position: the start of the next epoch, or ``cut`` when the step
        budget ended this one early (a resume with more steps finishes it)."""
        if epoch < self.model.method.item_refresh_epochs:      # Laser's stage 1: encode the items again
            self.refresh_items()
        if cut is None:                           # a whole epoch: the method's own phase (BDLM's domain model)
            record = self.model.method.end_epoch(self.model, epoch)
            if record is not None:
                self.state.method_evals.append(record)
        improved = self.evaluate(epoch) if self.h.valid else False
        self.state.epoch = epoch if cut else epoch + 1
        if self.ckpt is not None:
            evals = self.state.evals
            self.save(cut, best=improved, valid_auc=evals[-1]["valid_auc"] if evals else None)
        self.sync()

    def evaluate(self, epoch: int) -> bool:
        """Validation AUC over all ranks; on a better one also test and export the adapter. Returns whether
        it improved; after run.patience evaluations without improvement the loop stops."""
        from .evaluate import evaluate
        s = self.state
        valid, _ = evaluate(self.engine, self.h.valid[self.rank])
        s.evals.append({"epoch": epoch, "valid_auc": valid["auc"], "valid_uauc": valid["uauc"]})
        self.board.evaluation(s.step, s.evals[-1])
        if valid["auc"] <= s.best_auc:
            s.stale += 1
            s.stopped = s.stale >= self.cfg.run.patience
            return False
        s.best_auc, s.stale = valid["auc"], 0
        test, preds = evaluate(self.engine, self.h.test[self.rank]) if self.h.test else (None, None)
        s.best = {"epoch": epoch, "valid": valid, "test": test}
        ranked = None
        if self.h.rank:
            ranks, ranked = evaluate(self.engine, self.h.rank[self.rank])
            s.best["ranking"] = dict(ranks["ranking"], auc=ranks["auc"])
        self._export(preds, ranked)
        return True

    def _export(self, preds: dict | None, ranked: dict | None = None) -> None:
        """RUN/export (the adapter, for one-process use), RUN/test_predictions.parquet and, with a rank
        split, RUN/rank_predictions.parquet."""
        from .evaluate import export_trainable, exported_state
        weights = exported_state(self.model)                      # collective: every rank gathers
        if self.rank != 0 or self.out is None:
            return
        model_config = {k: to_dict(getattr(self.cfg, k)) for k in ("llm", "injection", "generator")}
        model_config["method"] = self.cfg.method
        section = self.model.method.section()
        if section is not None:
            model_config[self.cfg.method] = section
        export_trainable(weights, Path(self.out.local, "export"), dict(model_config, cf_dim=self.h.cf_dim))
        for name, table in (("test", preds), ("rank", ranked)):
            self._write_predictions(name, table)

    def _write_predictions(self, name: str, table: dict | None) -> None:
        """RUN/<name>_predictions.parquet (rank 0, when the run has a directory and ``table`` is not None)."""
        if table is None or self.rank != 0 or self.out is None:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(table), Path(self.out.local, f"{name}_predictions.parquet"))

    def save(self, cursor: dict | None, best: bool = False, valid_auc: float | None = None) -> None:
        """A checkpoint of this moment (a collective; the upload goes on in the background)."""
        self.ckpt.save(self.engine, self.model, self.state.step, asdict(self.state), cursor, best=best,
                       valid_auc=valid_auc)

    # ------------------------------------------------------------------ the end
    def cleanup(self) -> None:
        """Wait for the uploads to commit, close TensorBoard, write RUN/metrics.json (rank 0), copy this rank's
        files to an object-storage run directory (retrying up to run.sync_timeout_s, then failing)."""
        import ray
        import ray.train
        import torch.distributed as dist
        self.commits = self.ckpt.close() if self.ckpt is not None else []
        self.board.close()
        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.rank == 0 and self.out is not None:
            self._write_metrics(nodes)
        if self.out is not None:
            self.out.sync(final=True)
            dist.barrier()                     # ranks on one node share the mirror: all have copied their files
            if ray.train.get_context().get_local_rank() == 0:
                self.out.discard()
        for hook in self.h.hooks:
            hook.at_end(self)

    def _write_metrics(self, nodes: list[str]) -> None:
        """RUN/metrics.json: the best validation and its test metrics, every evaluation, where ranks ran."""
        s = self.state
        summary = {"valid": s.best["valid"] if s.best else None, "test": s.best["test"] if s.best else None,
                   "ranking": s.best.get("ranking") if s.best else None,
                   "best_epoch": s.best["epoch"] if s.best else None, "evaluations": s.evals, "steps": s.step,
                   "no_injection_test": s.no_injection,
                   "no_injection_ranking": s.no_injection_ranking, "resumed_from": s.resumed_from, "worker_nodes": nodes,
                   "method": self.cfg.method, "trainable_parameters": self.trainable_parameters(),
                   "partitioning": self.cfg.engine.partitioning, "zero_stage": self.engine.zero_optimization_stage(),
                   "samples": s.samples, "train_seconds": round(s.train_seconds, 3),
                   "tokens": s.tokens, "padded_tokens": s.padded_tokens,
                   "padding_share": round(s.padded_tokens / (s.tokens + s.padded_tokens), 4) if s.tokens else None,
                   "samples_per_second": round(s.samples / s.train_seconds, 2) if s.train_seconds else None}
        summary.update(self.model.method.summary(s.method_evals))
        from cora.fileio import write_bytes
        write_bytes(str(Path(self.out.local, "metrics.json")), json.dumps(summary, indent=1).encode())

    def trainable_parameters(self) -> int:
        """Elements of the trainable parameters (whole sizes, not this rank's ZeRO-3 partition)."""
        return int(sum(getattr(p, "ds_numel", p.numel()) for p in self.model.trainable_parameters()))

    def fit(self) -> LoopState:
        self.setup()
        cursor = self.restore()
        for epoch in range(self.state.epoch, self.cfg.run.epochs):
            if self.state.stopped or self.out_of_steps():
                break
            cut = self.train_epoch(epoch, cursor)
            cursor = None
            self.end_epoch(epoch, cut)
        self.cleanup()
        return self.state
