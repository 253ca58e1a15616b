"""Laser's M-Former (arXiv 2409.01605): a querying transformer that turns a user's history of item embeddings
(from a frozen ID-based sequential recommender: SASRec from ``cora train-cf``) into L virtual prefix tokens
for the frozen LLM, with K query experts and a top-1 router.

    x = W_in e(history)                               (B, T, H)   the history items' CF embeddings, projected
    g = softmax(mean_t router(e_t))                   (B, K)      one routing distribution per user
    k = argmax g;  q = Q[k]                           (B, L, H)   the chosen expert's L learned queries
    for each block b:  q = q + SelfAttn(q);  (b even) q = q + CrossAttn(q, x);  q = q + FFN(q)
    prefix = g_k * W_out q                            (B, L, d)   scaled by the gate (the router's gradient)
    balance = K * sum_k f_k P_k                       Switch Transformer's load-balancing loss: f_k the share
                                                      of users routed to k, P_k the mean gate probability

Routing picks rows of one query tensor, never a branch of modules: every rank runs the same modules on
every step whatever its users' experts, so ZeRO-3's all-gathers (issued per module) stay in step and
cannot hang on top-1 routing. The method (the suffix token, the item table, the contrastive loss) is
``cora.methods.laser``; ``history_embeddings`` and ``item_batch`` build its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MFormerConfig:
    """Sizes of the M-Former (the paper: 12 blocks, K = 8 experts of L = 32 queries)."""

    experts: int = 8
    """K: query experts; each user's history is routed to one."""
    queries: int = 32
    """L: queries per expert = prefix tokens given to the LLM."""
    blocks: int = 12
    """Transformer blocks; cross-attention to the history in every other one (the even ones)."""
    hidden_size: int = 768
    """Width of the queries inside the M-Former."""
    heads: int = 12
    """Attention heads (must divide hidden_size)."""
    dropout: float = 0.1

    def validate(self) -> list[str]:
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("experts", "queries", "blocks",
                                                                          "hidden_size", "heads")
                    if getattr(self, k) < 1]
        if not problems and self.hidden_size % self.heads:
            problems.append(f"heads={self.heads} must divide hidden_size={self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        return problems


class _Block(nn.Module):
    def __init__(self, h: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.self_norm, self.ffn_norm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.self_attn = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(h) if cross else None
        self.cross_attn = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True) if cross else None
        self.ffn = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * h, h))

    def forward(self, q: torch.Tensor, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        n = self.self_norm(q)
        q = q + self.self_attn(n, n, n, need_weights=False)[0]
        if self.cross_attn is not None:
            q = q + self.cross_attn(self.cross_norm(q), x, x, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ffn(self.ffn_norm(q))


class MFormer(nn.Module):
    """History item embeddings (B, T, d_cf) with a padding mask (B, T; True = padding) -> (prefix (B, L, d_model),
    the Switch load-balancing loss of the batch, the chosen expert per user (B,))."""

    def __init__(self, cfg: MFormerConfig, cf_dim: int, model_dim: int):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid M-Former config: " + "; ".join(problems))
        self.cfg = cfg
        h = cfg.hidden_size
        self.queries = nn.Parameter(torch.randn(cfg.experts, cfg.queries, h) * 0.02)
        self.inp = nn.Linear(cf_dim, h)
        self.router = nn.Linear(cf_dim, cfg.experts)
        self.blocks = nn.ModuleList(_Block(h, cfg.heads, cfg.dropout, cross=b % 2 == 0) for b in range(cfg.blocks))
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, model_dim)

    def route(self, history: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Each user's routing distribution (B, K): the softmax of the router's logits averaged over the real
        history items (a user without history gets the router's bias).

        The router is linear, so that average is the router of the mean real history embedding (the zero
        vector for an empty history: its bias). One call of the router, the same computation on every rank
        whatever the histories: a branch that read ``router.bias`` only when a batch had an empty history
        made the 2 ranks' ZeRO-3 collectives mismatch at the first step on sequential data (gloo aborted;
        tests/trainer/test_train_cli.py trains through that case)."""
        keep = (~pad).unsqueeze(-1).to(history.dtype)                          # (B, T, 1)
        mean = (history * keep).sum(1) / keep.sum(1).clamp(min=1.0)            # (B, d_cf); 0 when empty
        return torch.softmax(self.router(mean).float(), dim=-1)

    def forward(self, history: torch.Tensor, pad: torch.Tensor):
        gates = self.route(history, pad)                                        # (B, K)
        expert = gates.argmax(-1)                                               # (B,) top-1
        q = self.queries[expert]                                                # (B, L, H)
        x = self.inp(history)
        # a user without any history attends to nothing: let them attend to one (zero) padding slot
        pad = pad & ~(pad.all(-1, keepdim=True) & (torch.arange(pad.shape[1], device=pad.device) == 0))
        for block in self.blocks:
            q = block(q, x, pad)
        prefix = self.out(self.norm(q))                                         # (B, L, d_model)
        gate = gates.gather(1, expert.unsqueeze(1)).to(prefix.dtype)            # (B, 1)
        return prefix * gate.unsqueeze(-1), balance_loss(gates, expert), expert


def balance_loss(gates: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss K * sum_k f_k P_k over a batch: f_k the share of rows routed to
    expert k (no gradient), P_k the mean gate probability of k. 1 when balanced, K when all on one expert."""
    k = gates.shape[-1]
    share = F.one_hot(expert, k).float().mean(0)
    return k * (share * gates.float().mean(0)).sum()


def history_embeddings(histories, lookup, length: int, dim: int):
    """Each sample's last ``length`` history items (ids, oldest first) as CF item embeddings, left-padded:
    (history_emb (N, length, dim) float32, zeros at padding; history_pad (N, length) bool). ``lookup``: an
    (n_items, dim) array, or a function from an id array to its rows (the EmbeddingServers')."""
    import numpy as np

    from .cf.models import pad_history
    ids = pad_history(histories, length)                                   # (N, L), -1 = padding
    pad = ids < 0
    emb = np.zeros((*ids.shape, dim), dtype=np.float32)
    real = ids[~pad]
    if len(real):
        emb[~pad] = lookup(real) if callable(lookup) else np.asarray(lookup)[real]
    return emb, pad


def item_batch(encoders: dict, titles, domains, item_emb, ids, pad_id: int):
    """The Batch that encodes items ``ids`` as Laser does: each item's prompt is its domain's ``laser-`` template
    with a one-item history (its title), and the M-Former reads that one item's CF embedding."""
    import numpy as np

    from .prompts import pad_prompts
    from .scoring import Batch
    ids = np.asarray(ids, dtype=np.int64)
    tokens, lengths = pad_prompts([encoders[domains[i]].encode([titles[i]], "") for i in ids], pad_id)
    emb = torch.as_tensor(np.asarray(item_emb)[ids], dtype=torch.float32)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(lengths), emb, emb, items=torch.from_numpy(ids),
                 history_emb=emb.unsqueeze(1), history_pad=torch.zeros(len(ids), 1, dtype=torch.bool))
