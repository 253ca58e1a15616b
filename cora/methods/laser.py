"""Laser (arXiv 2409.01605) as a method: the M-Former prefix (``cora.laser``), a learned suffix token, the
item table and the contrastive loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..laser import MFormer, MFormerConfig
from .base import Method, weighted_mean


@dataclass
class LaserConfig(MFormerConfig):
    """Laser (arXiv 2409.01605): the M-Former's sizes (the paper's by default: 12 blocks, K = 8, L = 32),
    the contrastive loss and the item-encoding stages."""

    temperature: float = 0.05
    """Softmax temperature of the contrastive loss over the items' cosine similarities."""
    balance_weight: float = 0.01
    """Weight of the Switch load-balancing loss."""
    refresh_epochs: int = 1
    """Stage 1: the item encodings are recomputed at the start and after each of the first this-many epochs;
    stage 2: kept as they are."""
    history: int = 25
    """History items (the most recent) whose CF embeddings the M-Former reads."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        problems += [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("refresh_epochs", "history")
                     if getattr(self, k) < 1]
        return problems


class _Token(nn.Module):
    """One learned input embedding (Laser's suffix token), a module so that ZeRO-3 gathers it on use."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.weight


class Laser(Method):
    """Laser's Bi-Tuning: the frozen LLM reads [M-Former prefix (L tokens), the user's history prompt
    (``laser-<domain>``), a learned suffix token]; the suffix's output hidden state is the user's
    representation h_u. An item's h_i is the same model on a one-item history (its title; its CF
    embedding for the M-Former), kept in ``model.item_table`` (refreshed per ``refresh_epochs``). The score
    is cos(h_u, h_i); the loss a softmax over all items' cosines / temperature with the sample's item as
    the target (positive samples only) plus balance_weight x the router's balance loss. Nothing of the LLM
    trains: the M-Former and the suffix do."""

    name, uses_cf, adapter = "laser", True, "lora"
    template = "laser-"

    def __init__(self, cfg: LaserConfig | None = None, num_items: int = 0):
        self.cfg, self.num_items = cfg or LaserConfig(), num_items
        self.history_items, self.item_refresh_epochs = self.cfg.history, self.cfg.refresh_epochs

    def section(self):
        from dataclasses import asdict
        return dict(asdict(self.cfg), num_items=self.num_items)

    def attach(self, model, injection, generator, user_dim, item_dim):
        problems = self.cfg.validate()
        if problems:
            raise ValueError("invalid laser config: " + "; ".join(problems))
        model.injection, model.generator = None, None
        width = model.llm.get_input_embeddings().embedding_dim
        model.mformer = MFormer(self.cfg, item_dim, width)
        model.suffix = _Token(width)
        model.register_buffer("item_table", torch.zeros(self.num_items, width))

    def trainable(self, model):
        return list(model.mformer.parameters()) + list(model.suffix.parameters())

    def exported(self, model):
        named = {n: p for n, p in model.named_parameters() if n.startswith(("mformer.", "suffix."))}
        return dict(named, item_table=model.item_table)

    def state(self, model):
        return {"item_table": model.item_table}

    def inputs(self, model, batch):
        if batch.history_emb is None or batch.history_pad is None:
            raise ValueError("Laser needs each sample's history item embeddings (batch.history_emb, history_pad): "
                             "the data actors add them for method=laser (history_items)")
        embeds = model.llm.get_input_embeddings()(batch.input_ids)                    # (B, T, d)
        prefix, balance, _ = model.mformer(batch.history_emb.to(model.mformer.inp.weight.dtype), batch.history_pad)
        model.balance = balance
        b, t, d = embeds.shape
        x = torch.cat([prefix.to(embeds.dtype), embeds, embeds.new_zeros(b, 1, d)], dim=1)   # (B, L + T + 1, d)
        at = prefix.shape[1] + batch.lengths.to(x.device)                             # after the last real token
        where = (torch.arange(x.shape[1], device=x.device) == at.unsqueeze(1)).unsqueeze(-1)
        return {"inputs_embeds": torch.where(where, model.suffix().to(x.dtype), x), "positions": at}

    def score(self, model, batch, hidden):
        return F.cosine_similarity(hidden.float(), model.item_table[batch.items.to(hidden.device)].float(), dim=-1)

    def loss(self, model, batch, hidden, logits):
        table = F.normalize(model.item_table.float(), dim=-1)
        sims = F.normalize(hidden.float(), dim=-1) @ table.t() / self.cfg.temperature          # (B, n_items)
        per = F.cross_entropy(sims, batch.items.to(sims.device), reduction="none")
        w = batch.labels.to(per.device) * (1.0 if batch.weights is None else batch.weights.to(per.device))
        return weighted_mean(per, w) + self.cfg.balance_weight * model.balance
