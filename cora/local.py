"""Single-process training and scoring of a CoRAModel (notebooks, tests, the quick demo).

The cluster path (Ray actors feeding DeepSpeed ZeRO-3 workers) lives in ``trainer/``; this is the
same step without either, for one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from cora.optim import OptimConfig, build_optimizer
from cora.scoring import Batch, CoRAModel, collate


@dataclass
class Samples:
    """Encoded samples: prompt token ids, CF embeddings, labels (and user ids for UAUC)."""

    prompts: list[list[int]]
    user_emb: np.ndarray   # (N, du)
    item_emb: np.ndarray   # (N, di)
    labels: np.ndarray     # (N,)
    users: np.ndarray      # (N,)

    def __len__(self) -> int:
        return len(self.prompts)

    def batches(self, batch_size: int, pad_id: int, order: Sequence[int] | None = None) -> Iterator[Batch]:
        order = np.arange(len(self)) if order is None else np.asarray(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield collate([self.prompts[i] for i in idx], self.user_emb[idx], self.item_emb[idx],
                          self.labels[idx], pad_id)


def fit(model: CoRAModel, data: Samples, *, epochs: int, batch_size: int, pad_id: int,
        optim: OptimConfig | None = None, seed: int = 0, log=None) -> list[float]:
    """Train the model's trainable parameters; returns the loss of every step."""
    optim = optim or OptimConfig()
    steps = epochs * -(-len(data) // batch_size)
    opt, sched = build_optimizer(model.trainable_parameters(), optim, steps)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        for batch in data.batches(batch_size, pad_id, rng.permutation(len(data))):
            loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if log:
            log(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses[-steps // epochs:]):.4f}")
    return losses


@torch.no_grad()
def predict(model: CoRAModel, data: Samples, *, batch_size: int, pad_id: int) -> np.ndarray:
    """Yes-logits for every sample, in order."""
    model.eval()
    return np.concatenate([model(b).numpy() for b in data.batches(batch_size, pad_id)])
