"""Hooks: where tests and benchmarks look into a running worker, installed through the driver's
``Handover`` (production runs install none). ``Report`` writes what a benchmark or a test reads back."""

from __future__ import annotations

import json
from pathlib import Path


class Hooks:
    """No-op base: override what you need. ``recipe`` is the worker's ``trainer.recipe.Recipe``."""

    def after_setup(self, recipe) -> None:
        """The model and engine exist; nothing has been trained or restored yet."""

    def after_step(self, recipe, record: dict, batch: dict) -> None:
        """One training step is done: its record (loss, phase times, sample ids...) and the raw batch."""

    def at_end(self, recipe) -> None:
        """Training is over (checkpoints committed, metrics written)."""


class Report(Hooks):
    """``OUT/rank<r>.json`` per rank: every step's record (the first ``record_batches`` with their raw
    batch), this rank's LLM partition, peak memory, the trainable size and checkpoint timings."""

    def __init__(self, out_dir: str | Path, record_batches: int = 0):
        self.out_dir, self.record_batches, self.log = str(out_dir), record_batches, []
        self.setup_memory: dict = {}

    def after_setup(self, recipe) -> None:
        self.setup_memory = resident_memory()          # the model and engine built, before any step

    def after_step(self, recipe, record: dict, batch: dict) -> None:
        record = dict(record, padded_tokens=record["tokens"] + record["padded"])   # what the step computed on
        if len(self.log) < self.record_batches:          # for comparisons with a 1-process run
            record = dict(record, batch={k: v.tolist() for k, v in batch.items()})
        self.log.append(record)

    def at_end(self, recipe) -> None:
        from deepspeed.utils import z3_leaf_module

        from trainer.engine import frozen_weights, partition_stats
        model, ckpt = recipe.model, recipe.ckpt
        out = {"rank": recipe.rank, "world_size": recipe.world, "log": self.log,
               "llm_partition": partition_stats(frozen_weights(model.llm)),
               "activation_checkpointing": bool(model.llm.is_activation_checkpointing),
               "zero3_leaves": [n for n, m in model.named_modules() if z3_leaf_module(m)],
               "resumed_from": recipe.state.resumed_from, "memory": peak_memory(),
               "setup_memory": self.setup_memory,
               "trainable_bytes": recipe.trainable_parameters() * 4,   # fp32, whole sizes
               "zero_stage": recipe.engine.zero_optimization_stage(),
               "checkpoints": {"commits": [vars(c) for c in recipe.commits],
                               "save_seconds": ckpt.save_seconds if ckpt is not None else []}}
        Path(self.out_dir, f"rank{recipe.rank}.json").write_text(json.dumps(out))


def peak_memory() -> dict:
    """This process's peak resident memory and, on a GPU, peak allocated device memory (MiB)."""
    import resource

    import torch
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def resident_memory() -> dict:
    """This process's resident memory now and its high-water mark so far (MiB, from /proc; {} elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    keys = {"VmRSS:": "rss_mib", "VmHWM:": "hwm_mib"}
    return {keys[f[0]]: round(int(f[1]) / 1024, 1) for f in (line.split() for line in status) if f and f[0] in keys}
