"""Distributed evaluation and export inside the worker group.

``predict`` scores one rank's share of a split (real samples only; padding dropped), ``evaluate``
gathers every rank's predictions and computes AUC/UAUC on all, warm and cold samples (the same
numbers on every rank). ``export_trainable`` gathers the trained generator and P from their ZeRO-3
partitions and writes them, with the JSON config needed to rebuild the model, for single-process use
(``cora.export.load_exported``). Rank 0 reports the progress of each scored split on stderr
(``Progress``).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from cora.metrics import evaluate as metrics
from cora.metrics import ranking


class Progress:
    """Rank 0's progress through a split: a line on stderr every ``every`` seconds (never one per batch;
    Ray forwards each line to the driver's log) and a last one with the total time, e.g.

        [eval] test: 40/125 batches, 312 samples/s, ETA 0:00:27
        [eval] test: 125 batches, 10000 samples in 0:00:31 (322 samples/s)

    Samples are all ranks' real samples, counted as rank 0's times the world size: the ranks score in
    lockstep (each ZeRO-3 forward is a collective) and hold equal shares of the split."""

    def __init__(self, split: str, batches: int, world: int, every: float = 10.0, clock=time.monotonic,
                 out=None):
        self.split, self.batches, self.world, self.every, self.clock = split, batches, world, every, clock
        self.out = out or sys.stderr
        self.done = self.samples = 0
        self.start = self.last = clock()

    def update(self, samples: int) -> None:
        """One batch of this rank done, with ``samples`` real samples."""
        self.done += 1
        self.samples += samples * self.world
        now = self.clock()
        if now - self.last >= self.every and self.done < self.batches:
            self.last = now
            spent = now - self.start
            rate, eta = self.samples / spent, (self.batches - self.done) * spent / self.done
            self._print(f"{self.done}/{self.batches} batches, {rate:.0f} samples/s, ETA {_clock(eta)}")

    def close(self) -> None:
        took = self.clock() - self.start
        self._print(f"{self.done} batches, {self.samples} samples in {_clock(took)} "
                    f"({self.samples / max(took, 1e-9):.0f} samples/s)")

    def _print(self, msg: str) -> None:
        print(f"[eval] {self.split}: {msg}", file=self.out, flush=True)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def predict(engine, actor, epoch: int = 0) -> dict[str, np.ndarray]:
    """This rank's scores of its share of a split (real samples only), with their ids, users, labels
    and cold flags; rank 0 reports progress."""
    import torch.distributed as dist

    from cluster.client import BatchIterator

    from cora.scoring import Batch
    fields = ("sample_ids", "users", "labels", "cold", "queries")
    keep: dict[str, list] = {k: [] for k in fields + ("scores",)}
    it = BatchIterator(actor, epoch)
    rank = dist.get_rank() if dist.is_initialized() else 0
    progress = Progress(it.info["split"], len(it), it.info["world_size"]) if rank == 0 else None
    engine.eval()
    with torch.no_grad():
        for raw in it:
            real = raw["weights"] > 0
            scores = engine(Batch.from_arrays(raw, engine.device)).float().cpu().numpy()   # (B,)
            for k in fields:
                keep[k].append(raw[k][real])
            keep["scores"].append(scores[real])
            if progress is not None:
                progress.update(int(real.sum()))
    engine.train()
    if progress is not None:
        progress.close()
    return {k: np.concatenate(v) if v else np.array([]) for k, v in keep.items()}


def evaluate(engine, actor, epoch: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics over the whole split, all ranks' predictions) on every rank. The rank split (every row
    in a query: a test positive and its recorded negatives) also gets its ranking metrics
    (``cora.metrics.ranking``: Recall@K, NDCG@K, MRR per query and per user) under "ranking"."""
    import torch.distributed as dist
    mine = predict(engine, actor, epoch)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    allp = {k: np.concatenate([p[k] for p in parts]) for k in mine}
    result = metrics(allp["labels"], allp["scores"], allp["users"], cold=allp["cold"])
    if len(allp["queries"]) and (allp["queries"] >= 0).all():
        result["ranking"] = ranking(allp["queries"], allp["labels"], allp["scores"], users=allp["users"])
    return result, allp


def exported_state(model) -> dict[str, torch.Tensor]:
    """The tensors the model's method exports (``Method.exported``: the trainable ones, e.g. the generator
    and P, plus frozen ones it brought in, e.g. CoLLM's stage-1 LoRA), gathered from their ZeRO-3
    partitions (a collective)."""
    import deepspeed
    named = model.method.exported(model)
    with deepspeed.zero.GatheredParameters(list(named.values())):
        return {n: p.detach().clone().cpu().contiguous() for n, p in named.items()}


def export_trainable(state: dict[str, torch.Tensor], out: Path, model_config: dict) -> None:
    """``adapter.safetensors`` (the method's exported tensors, never the LLM) and ``config.json`` into ``out``."""
    from safetensors.torch import save_file

    from cora.fileio import write_atomically

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=1))
    write_atomically(Path(out), write)
