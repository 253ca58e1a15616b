"""The ``cora train`` configuration: one typed section per concern, validated strictly
(``cora.config``: unknown keys rejected, every problem reported at once, ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cora.fileio import location_problem
from cora.generator import GeneratorConfig
from cora.injection import InjectionConfig
from cora.llm import LLMConfig
from cora.bdlm import BDLMConfig
from cora.methods import CoLLMConfig, LaserConfig, RecCocktailConfig
from cora.optim import OptimConfig

from .engine import EngineConfig


@dataclass
class DataConfig:
    """Where the prepared data and the CF model are, and how batches are built."""

    data_dir: str = "runs/demo/data"
    """A directory written by `cora prepare` (local path or s3://, gs://, file://: the actors stream its shards)."""
    cf_dir: str = "runs/demo/cf"
    """A directory written by `cora train-cf` (local path or s3://, gs://, file://)."""
    embedding_shards: int = 1
    """EmbeddingServer actors per table."""
    max_history: int = 10
    """History titles in a prompt."""
    max_length: int = 512
    """Prompt length limit in tokens (oldest titles dropped first)."""
    prefetch: int = 4
    """Ready batches each InteractionShard actor keeps queued."""
    eval_batch_size: int | None = None
    """Samples per rank in each validation/test forward (no backward, so it can be far larger than the
    micro-batch); None = engine.micro_batch_size."""
    bucket_window: int = 0
    """Length bucketing: > 0 reorders each rank's epoch in windows of this many batches, so that a batch
    holds prompts of similar length (less padding); seeded, exactly once and resumable like the plain order
    (cluster/plan.py). 0: the plain random order."""
    pad_multiple: int = 1
    """Round each batch's token dimension up to a multiple of this (8 for GPU matrix units; 1 on the CPU)."""

    def validate(self) -> list[str]:
        problems = [f"data.{k} must be >= 1, got {getattr(self, k)}"
                    for k in ("embedding_shards", "max_length", "prefetch", "pad_multiple") if getattr(self, k) < 1]
        if self.bucket_window < 0:
            problems.append(f"data.bucket_window must be >= 0 (0: no length bucketing), got {self.bucket_window}")
        problems += [p for p in (location_problem(self.data_dir, "data.data_dir"),
                                 location_problem(self.cf_dir, "data.cf_dir")) if p]
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"data.eval_batch_size must be >= 1 or null (= engine.micro_batch_size), "
                            f"got {self.eval_batch_size}")
        return problems

    def eval_batch(self, micro_batch_size: int) -> int:
        """Samples per rank in a validation/test batch: eval_batch_size, or the micro-batch when None."""
        return self.eval_batch_size or micro_batch_size


@dataclass
class RunConfig:
    """The job: where it writes, how long it trains, how many workers."""

    run_dir: str = "runs/demo/run"
    """Run directory: metrics.json, tensorboard/, export/, test_predictions.parquet, checkpoints/; a path or
    an s3://, gs://, file:// URI (workers write a local mirror and sync it there: trainer.rundir)."""
    epochs: int = 1
    """Training epochs (validation after each)."""
    patience: int = 3
    """Stop after this many validations without a better valid AUC."""
    workers: int = 2
    """Ray Train workers (ranks); the LLM is partitioned across them."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (also its torch threads)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu: gloo, fp32; cuda: NCCL, one GPU per worker (set engine.bf16: true for bf16)."""
    seed: int = 0
    """Seeds the generator's initialisation and the data order."""
    address: str | None = None
    """A running Ray cluster to join ('auto' or HOST:PORT; its auth token must be in RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); None starts a local one."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (a step is engine.gradient_accumulation micro-batches)."""
    wait_for_resources: bool = False
    """Wait for CPUs/GPUs to become free (autoscaling clusters) instead of failing at once."""
    overwrite: bool = False
    """Replace the results and checkpoints of an earlier run in run_dir (else such a run_dir is refused)."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue the run in run_dir from its newest committed checkpoint (a fresh start if none)."""
    checkpoint_uri: str | None = None
    """Where checkpoints go: a path, file://, s3:// (endpoint: CORA_S3_ENDPOINT) or gs://; None = RUN/checkpoints."""
    checkpoint_every: int = 200
    """Checkpoint every this many optimiser steps (0: only after each validation, which always checkpoints)."""
    keep_last: int = 3
    """Committed checkpoints kept besides the best one; older ones are deleted."""
    max_failures: int = 3
    """Worker-group failures Ray Train recovers from (restarting from the newest committed checkpoint)."""
    sample_log: bool = False
    """Append every micro-batch's sample ids, loss and learning rate, with its optimiser step and index in
    the step, to RUN/samples/rank<r>.jsonl (an audit of exactly-once)."""
    eval_baseline: bool = True
    """Score the test split once before training, when P is still zero (the frozen LLM without
    injection; each method's model at step 0): the no-injection baseline, reported as no_injection_test,
    and the rank split the same way when the data has one (no_injection_ranking)."""
    dashboard: bool = True
    """Start the Ray dashboard (on 127.0.0.1) with the local Ray instance; its URL is printed."""
    sync_timeout_s: float = 300.0
    """Object-storage run_dir: how long the final copy of a worker's run files retries before it fails."""
    keep_freed_memory: bool = True
    """Every worker keeps the memory a step frees for the next step instead of giving it back to the kernel
    (glibc's allocator, ``cora.allocator``): no page faults on the same pages every step. False: glibc's
    defaults (a smaller resident set between steps on a machine whose memory other processes need)."""

    def validate(self) -> list[str]:
        problems = [f"run.{k} must be >= 1, got {getattr(self, k)}" for k in ("epochs", "patience", "workers",
                                                                                 "cpus_per_worker")
                    if getattr(self, k) < 1]
        problems += [f"run.{k} must be >= 0, got {getattr(self, k)}" for k in ("checkpoint_every", "keep_last",
                                                                             "max_failures") if getattr(self, k) < 0]
        if self.resume == "auto" and self.overwrite:
            problems.append("run.resume=auto and run.overwrite=true contradict each other: pick one")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"run.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.sync_timeout_s <= 0:
            problems.append(f"run.sync_timeout_s must be > 0, got {self.sync_timeout_s}")
        problems += [p for p in (location_problem(self.run_dir, "run.run_dir"),
                                 self.checkpoint_uri and location_problem(self.checkpoint_uri, "run.checkpoint_uri"))
                     if p]
        return problems


@dataclass
class TrainConfig:
    """Everything `cora train` needs."""

    method: Literal["cora", "tallrec", "collm", "reccocktail", "laser", "bdlm"] = "cora"
    """The method trained on the frozen LLM (cora.methods): 'cora' (the generator's per-sample A from the
    CF embeddings), 'tallrec' (LoRA on the same prompt, no CF input), 'collm' (the CF embeddings mapped
    into two token slots of CoLLM's prompt; LoRA from a tallrec run, frozen: see the collm section) or
    'reccocktail' (two tallrec LoRAs mixed by weights learned without labels: the reccocktail section) or
    'laser' (an M-Former prefix and a suffix token; cosine scores against item encodings: the laser section) or
    'bdlm' (user and item slots fed from a store shared with a LightGCN domain model, trained in alternation:
    the bdlm section)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and CF inputs."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The frozen LLM."""
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    """Where and how the per-sample update is injected."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The collaborative weights generator (method=cora)."""
    collm: CoLLMConfig = field(default_factory=CoLLMConfig)
    """CoLLM's mapping and its first stage (method=collm)."""
    reccocktail: RecCocktailConfig = field(default_factory=RecCocktailConfig)
    """RecCocktail's two LoRAs and their merge (method=reccocktail)."""
    laser: LaserConfig = field(default_factory=LaserConfig)
    """Laser's M-Former, its contrastive loss and item-encoding stages (method=laser)."""
    bdlm: BDLMConfig = field(default_factory=BDLMConfig)
    """BDLM's shared store, its domain model and their mutual learning (method=bdlm)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the warm-up + cosine schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed ZeRO-3."""
    run: RunConfig = field(default_factory=RunConfig)
    """The job."""

    def validate(self) -> list[str]:
        from cora.methods import get_method
        adapter = get_method(self.method).adapter
        if self.injection.adapter not in ("cora", adapter):
            return [f"injection.adapter={self.injection.adapter!r} contradicts method={self.method!r} (which uses "
                    f"{adapter!r}); the method sets the adapter: for LoRA without CF input set method=tallrec"]
        problems = []
        if self.collm.lora_from and self.method != "collm":
            problems.append(f"collm.lora_from={self.collm.lora_from!r} is set but method={self.method!r}: it is "
                            f"CoLLM's first stage; set method=collm, or drop collm.lora_from")
        cocktail = {k: getattr(self.reccocktail, k) for k in ("base_from", "ingredient_from")}
        if self.method != "reccocktail" and any(cocktail.values()):
            problems.append(f"reccocktail.base_from/ingredient_from are set but method={self.method!r}; set "
                            f"method=reccocktail, or drop them")
        if self.method == "reccocktail":
            problems += [f"method=reccocktail needs reccocktail.{k}: the export directory of a method=tallrec run on "
                         f"the {'source domains' if k == 'base_from' else 'target domain'}' data"
                         for k, v in cocktail.items() if not v]
        e = self.engine
        if isinstance(e.node_ranks, int) and 1 <= e.node_ranks < self.run.workers and self.run.workers % e.node_ranks:
            problems.append(f"engine.node_ranks={e.node_ranks} does not divide run.workers={self.run.workers}: a node "
                            f"holds node_ranks workers (hpz's secondary groups are whole nodes); set a divisor")
        return problems
