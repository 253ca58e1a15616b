"""Distributed evaluation and export inside the worker group.

``predict`` scores one rank's share of a split (real samples only; padding dropped), ``evaluate``
gathers every rank's predictions and computes AUC/UAUC on all, warm and cold samples (the same
numbers on every rank). ``export_trainable`` gathers the trained generator and P from their ZeRO-3
partitions and writes them, with the JSON config needed to rebuild the model, for single-process use
(``cora.export.load_exported``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cora.metrics import evaluate as metrics


def predict(engine, actor, epoch: int = 0) -> dict[str, np.ndarray]:
    from cluster.client import BatchIterator

    from cora.scoring import Batch
    keep: dict[str, list] = {k: [] for k in ("sample_ids", "users", "labels", "cold", "scores")}
    engine.eval()
    with torch.no_grad():
        for raw in BatchIterator(actor, epoch):
            real = raw["weights"] > 0
            scores = engine(Batch.from_arrays(raw)).float().numpy()
            for k in ("sample_ids", "users", "labels", "cold"):
                keep[k].append(raw[k][real])
            keep["scores"].append(scores[real])
    engine.train()
    return {k: np.concatenate(v) if v else np.array([]) for k, v in keep.items()}


def evaluate(engine, actor, epoch: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics over the whole split, all ranks' predictions) on every rank."""
    import torch.distributed as dist
    mine = predict(engine, actor, epoch)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    allp = {k: np.concatenate([p[k] for p in parts]) for k in mine}
    return metrics(allp["labels"], allp["scores"], allp["users"], cold=allp["cold"]), allp


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters (generator, P), gathered from ZeRO-3 partitions (a collective)."""
    import deepspeed
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(named.values())):
        return {n: p.detach().clone().cpu().contiguous() for n, p in named.items()}


def export_trainable(state: dict[str, torch.Tensor], out: Path, model_config: dict) -> None:
    """``adapter.safetensors`` (generator + P, never the LLM) and ``config.json`` into ``out``."""
    from safetensors.torch import save_file

    from cora.fileio import write_atomically

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=1))
    write_atomically(Path(out), write)
