"""The collaborative weights generator: CF embeddings -> per-sample low-rank matrices A.

As in CoRA (arXiv 2408.10645): the concatenated user and target-item CF embeddings form a single
cross-attention key/value token for a BLIP-2 Q-Former (transformers' ``Blip2QFormerModel``; 8 layers,
8 heads, hidden 512, cross-attention in every layer) read by ``num_queries`` learnable queries
(init N(0, 0.02)). Each query output goes through ``Linear(hidden -> d_in * r)``; the results are
averaged over the queries, L2-normalised over the whole flattened vector and reshaped to
``A: (B, d_in, r)``.

Since the projection is affine, the mean of the projected queries equals the projection of the mean
query, so the mean is taken first (the same result at 1/num_queries of the projection cost).

``per_layer=True`` gives each decoder layer its own A: the Q-Former reads ``num_queries`` queries per
layer (L * num_queries in one pass), each layer's group is averaged, projected with the shared
Linear and normalised on its own -> ``A: (B, L, d_in, r)``.

One A is produced per distinct input width of the injected modules (``d_model`` for q/k/v/o; the MLP
width too when ``down_proj`` is a target), each by its own projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


@dataclass
class GeneratorConfig:
    """Shape of the collaborative weights generator (the paper's values are the defaults)."""

    hidden_size: int = 512
    """Q-Former hidden size."""
    num_layers: int = 8
    """Q-Former layers (each with cross-attention to the CF token)."""
    num_heads: int = 8
    """Attention heads in the Q-Former."""
    intermediate_size: int = 2048
    """Q-Former feed-forward width."""
    num_queries: int = 4
    """Learnable query tokens (per decoder layer when injection.per_layer)."""
    dropout: float = 0.1
    """Q-Former hidden and attention dropout."""

    def validate(self) -> list[str]:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_queries")
                    if getattr(self, name) < 1]
        if self.hidden_size >= 1 and self.num_heads >= 1 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        return problems


class CollaborativeWeightsGenerator(nn.Module):
    """(user_emb (B, du), item_emb (B, di)) -> one A per input width, (B, d_in, r) or (B, L, d_in, r).

    ``forward`` returns a tuple ordered as ``widths`` (DeepSpeed's ZeRO-3 module hooks accept tensors,
    tuples and string-keyed dicts as outputs); ``weights`` gives the {d_in: A} dict the injection takes."""

    def __init__(self, cfg: GeneratorConfig, user_dim: int, item_dim: int, widths: set[int] | list[int],
                 rank: int, num_layers: int = 1, per_layer: bool = False):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid generator config: " + "; ".join(problems))
        if user_dim < 1 or item_dim < 1:
            raise ValueError(f"embedding sizes must be >= 1, got user_dim={user_dim}, item_dim={item_dim}")
        self.user_dim, self.item_dim, self.rank = user_dim, item_dim, rank
        self.groups = num_layers if per_layer else 1
        self.per_layer = per_layer
        self.num_queries = cfg.num_queries
        qcfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            encoder_hidden_size=user_dim + item_dim, cross_attention_frequency=1,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        self.qformer = Blip2QFormerModel(qcfg)
        self.queries = nn.Parameter(torch.empty(1, self.groups * cfg.num_queries, cfg.hidden_size))
        nn.init.normal_(self.queries, std=0.02)
        self.widths = sorted(widths)
        self.heads = nn.ModuleDict({str(w): nn.Linear(cfg.hidden_size, w * rank) for w in self.widths})

    def weights(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> dict[int, torch.Tensor]:
        """{d_in: A} for ``Injection.set_weights``."""
        return dict(zip(self.widths, self(user_emb, item_emb)))

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check(user_emb, item_emb)
        b = user_emb.shape[0]
        cf = torch.cat([user_emb, item_emb], dim=-1).unsqueeze(1)        # (B, 1, du+di): one K/V token
        cf = cf.to(self.queries.dtype)
        q = self.queries.expand(b, -1, -1)                                # (B, G*Q, H)
        # q positional: it requires a gradient, so a backward hook on the Q-Former (ZeRO-3's, when the trainer
        # hooks it as one module) fires after its parameters' gradients (torch sees positional inputs only)
        out = self.qformer(q, encoder_hidden_states=cf, return_dict=False)[0]   # a tuple: hooks see tensors
        pooled = out.view(b, self.groups, self.num_queries, -1).mean(2)   # (B, G, H): mean over queries
        result = []
        for w in self.widths:
            flat = F.normalize(self.heads[str(w)](pooled), dim=-1)       # (B, G, w*r), unit L2 norm
            a = flat.view(b, self.groups, w, self.rank)                   # (B, G, w, r)
            result.append(a if self.per_layer else a[:, 0])
        return tuple(result)

    def _check(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> None:
        if user_emb.dim() != 2 or item_emb.dim() != 2:
            raise ValueError(f"expected 2-D (batch, dim) embeddings, got user {tuple(user_emb.shape)}, "
                             f"item {tuple(item_emb.shape)}")
        if user_emb.shape[0] == 0:
            raise ValueError("empty batch: 0 samples given to the generator")
        if user_emb.shape[0] != item_emb.shape[0]:
            raise ValueError(f"batch sizes differ: {user_emb.shape[0]} users vs {item_emb.shape[0]} items")
        if user_emb.shape[1] != self.user_dim or item_emb.shape[1] != self.item_dim:
            raise ValueError(f"embedding size mismatch: got user {user_emb.shape[1]}, item "
                             f"{item_emb.shape[1]}; the generator was built for user {self.user_dim}, "
                             f"item {self.item_dim} (match the CF model's embedding size)")
