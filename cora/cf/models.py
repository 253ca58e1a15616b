"""The collaborative-filtering (CF) models whose user and item vectors feed CoRA's generator.

Every model scores a (user, item) pair with a dot product of a user vector and an item vector::

    logit(u, i) = <p_u, q_i>        p_u, q_i in R^d

and differs only in how ``p_u`` and ``q_i`` are made:

  MF        p_u = P[u], q_i = Q[i]: free embedding tables (CoLLM's MF).
  LightGCN  the tables propagated over the normalised user-item graph of the train positives,
            E = (1 / (K + 1)) sum_{k=0..K} A_hat^k E_0,  A_hat = D^-1/2 A D^-1/2  (He et al., 2020).
  SASRec    p_u = the causal transformer's output at the last position of the user's history
            (left-padded, most recent item last); q_i = the item embedding (Kang & McAuley, 2018).

``score(batch) -> (B,)`` gives the logits, ``item_vectors() -> (n_items, d)`` the item table and
``user_vectors(batch) -> (B, d)`` the user vector of each sample (a table row for MF and LightGCN,
computed from ``batch.history`` for SASRec). Histories are int64 ``(B, L)`` item ids, left-padded
with ``HISTORY_PAD`` (-1), because 0 is a real item id.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cora.injection import adapter_dropout

HISTORY_PAD = -1
MODEL_NAMES = ("mf", "lightgcn", "sasrec")


def pad_history(lists, length: int) -> np.ndarray:
    """Python lists of item ids (oldest first) -> (N, length) int64: the last ``length`` ids of each,
    right-aligned, left-padded with HISTORY_PAD (the layout ``user_vectors_from_history`` takes)."""
    out = np.full((len(lists), length), HISTORY_PAD, dtype=np.int64)
    for row, h in enumerate(lists):
        h = list(h)[-length:]
        if h:
            out[row, -len(h):] = h
    return out


@dataclass
class CFBatch:
    """One mini-batch of (user, item) pairs, aligned row by row."""

    users: torch.Tensor
    """(B,) int64 dense user ids."""
    items: torch.Tensor
    """(B,) int64 dense item ids."""
    history: torch.Tensor | None = None
    """(B, L) int64 earlier positive items, left-padded with HISTORY_PAD; needed by SASRec only."""


class CFModel(nn.Module):
    """Base class: ``logit = <user_vectors(batch), item vector of batch.items>``."""

    name: ClassVar[str] = ""

    def __init__(self, num_users: int, num_items: int, dim: int):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim

    def pair_vectors(self, batch: CFBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors (B, d), item vectors (B, d)) of the batch's pairs."""
        raise NotImplementedError

    def score(self, batch: CFBatch) -> torch.Tensor:
        """Logits (B,) = row-wise dot products of the pair vectors."""
        p, q = self.pair_vectors(batch)              # (B, d), (B, d)
        return (p * q).sum(-1)                       # (B,)

    def user_vectors(self, batch: CFBatch) -> torch.Tensor:
        """(B, d) user vector of each sample."""
        return self.pair_vectors(batch)[0]

    def item_vectors(self) -> torch.Tensor:
        """(n_items, d) the vectors the logits use for items."""
        raise NotImplementedError


class MF(CFModel):
    """Matrix factorisation: logit = <P[u], Q[i]>, tables initialised N(0, 0.1^2)."""

    name = "mf"

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.1):
        super().__init__(num_users, num_items, dim)
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def pair_vectors(self, batch):
        return self.user_emb(batch.users), self.item_emb(batch.items)

    def user_table(self) -> torch.Tensor:
        """(n_users, d) every user's vector."""
        return self.user_emb.weight

    def item_vectors(self):
        return self.item_emb.weight


# ----------------------------------------------------------------------------- LightGCN
class _SymmetricSpMM(torch.autograd.Function):
    """Y = A X for a symmetric sparse A; the backward uses A^T = A, so dL/dX = A dL/dY."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adj, grad)


def normalised_adjacency(edges: torch.Tensor, num_users: int, num_items: int) -> torch.Tensor:
    """A_hat = D^-1/2 A D^-1/2 of the bipartite graph, as a sparse CSR (n, n), n = users + items.

    ``edges``: (2, E) int64 (user, item) pairs; duplicates count once. Node ``num_users + i`` is
    item i. Nodes without edges have degree 0 and get a zero row (no division by zero).
    """
    n = num_users + num_items
    key = torch.unique(edges[0] * num_items + edges[1])        # (E',) deduplicated pairs
    u, i = key // num_items, key % num_items + num_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])          # (2E',) both directions
    deg = torch.bincount(rows, minlength=n).float()            # (n,)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    vals = inv_sqrt[rows] * inv_sqrt[cols]                      # (2E',)
    adj = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False)
    with warnings.catch_warnings():      # "sparse CSR support is in beta": the product used here is not
        warnings.simplefilter("ignore", UserWarning)
        return adj.coalesce().to_sparse_csr()


class LightGCN(CFModel):
    """LightGCN: E = mean_{k=0..K} A_hat^k E_0 over the train-positive graph; logit = <e_u, e_i>.

    The whole table is propagated in every training forward (once per optimisation step), because
    every propagated row depends on the current E_0 (the same as the reference implementation);
    that costs 2K sparse-dense products of (n, n) x (n, d) per step, forward and backward. In eval
    mode the propagated table is computed once and cached until the model trains again.
    The graph (``edges``) is a saved buffer, so a model loaded from its state dict propagates alone.
    """

    name = "lightgcn"

    def __init__(self, num_users: int, num_items: int, dim: int, edges: torch.Tensor,
                 layers: int = 2, init_std: float = 0.1):
        super().__init__(num_users, num_items, dim)
        self.layers = layers
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self.register_buffer("edges", edges.to(torch.int64).reshape(2, -1).contiguous())
        self._adj: torch.Tensor | None = None
        self._cache: torch.Tensor | None = None

    def train(self, mode: bool = True):
        self._cache = None        # parameters may change: recompute the eval table next time
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._adj = self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def propagate(self) -> torch.Tensor:
        """(n_users + n_items, d) the layer-mean of A_hat^k E_0, k = 0..K."""
        if not self.training and self._cache is not None:
            return self._cache
        if self._adj is None:
            self._adj = normalised_adjacency(self.edges, self.num_users, self.num_items)
        e = torch.cat([self.user_emb.weight, self.item_emb.weight])   # (n, d) = E_0
        total = e
        for _ in range(self.layers):
            e = _SymmetricSpMM.apply(self._adj, e)                      # (n, d) = A_hat^k E_0
            total = total + e
        out = total / (self.layers + 1)
        if not self.training:
            self._cache = out.detach()
        return out

    def pair_vectors(self, batch):
        e = self.propagate()
        return e[batch.users], e[self.num_users + batch.items]

    def user_table(self) -> torch.Tensor:
        """(n_users, d) every user's propagated vector."""
        return self.propagate()[: self.num_users]

    def item_vectors(self):
        return self.propagate()[self.num_users:]


# ----------------------------------------------------------------------------- SASRec
class _Dropout(nn.Module):
    """Dropout drawing only the dropped positions on the CPU (cora.injection.adapter_dropout; F.dropout on CUDA)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, factor = adapter_dropout(x, self.p, self.training)
        return y if factor == 1.0 else y * factor


class _Block(nn.Module):
    """One pre-LN transformer block (the layout of nn.TransformerEncoderLayer(norm_first=True))::

        x <- x + drop(MHA(LN1(x)_q, LN1(x), LN1(x)))
        x <- x + drop(W2 drop(relu(W1 LN2(x))))

    With ``last_only`` the queries, the residual stream and the feed-forward are the last position
    only (keys and values still span the sequence): the final block's output is read there alone.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = _Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        h = self.norm1(x)                                                  # (B, L, d)
        if last_only:
            x, blocked = x[:, -1:], blocked[:, -1:]                        # (B, 1, d), (B*H, 1, L)
        a, _ = self.attn(h[:, -x.shape[1]:], h, h, attn_mask=blocked, need_weights=False)  # (B, Lq, d)
        x = x + self.drop(a)
        return x + self.drop(self.ff2(self.drop(torch.relu(self.ff1(self.norm2(x))))))


class SASRec(CFModel):
    """SASRec: a causal pre-LN transformer over the user's history; logit = <LN(h_L), Q[i]>.

    With x_t = Q'[h_t] * sqrt(d) + pos_t (dropout; padding rows zeroed) for the left-padded history
    h_1..h_L, ``blocks`` causal self-attention blocks (``_Block``) give h_1..h_L; the user vector is
    LayerNorm(h_L), the most recent position. Q' has an extra row 0 for padding (item i is row
    i + 1), so Q = Q'[1:].

    Attention mask: a query sees earlier and equal positions that are not padding, and always
    itself. A padding position therefore attends only to itself and stays finite, and an empty
    history (all padding) yields a finite vector learned from the last position's embedding.
    Training reads only the last position (a CTR objective on the target item, as CoLLM uses
    SASRec), so the final block computes only that position (``last_only``).
    """

    name = "sasrec"

    def __init__(self, num_users: int, num_items: int, dim: int, max_history: int = 25,
                 blocks: int = 2, heads: int = 1, dropout: float = 0.2):
        super().__init__(num_users, num_items, dim)
        self.max_history, self.heads = max_history, heads
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_history, dim)
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.drop = _Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim)

    def _mask(self, pad: torch.Tensor) -> torch.Tensor:
        """(B * heads, L, L) bool, True = may not attend: future keys and padding keys, never self."""
        L = pad.shape[1]
        future = torch.ones(L, L, dtype=torch.bool, device=pad.device).triu(1)   # (L, L)
        blocked = future.unsqueeze(0) | pad.unsqueeze(1)                          # (B, L, L)
        blocked &= ~torch.eye(L, dtype=torch.bool, device=pad.device)            # self always seen
        return blocked.repeat_interleave(self.heads, dim=0)                       # (B*H, L, L)

    def _fit_length(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, L): keep the last L items, or left-pad with HISTORY_PAD."""
        if history.dim() != 2:
            raise ValueError(f"history must be (batch, length), got shape {tuple(history.shape)}")
        history, L = history.long(), self.max_history
        if history.shape[1] >= L:
            return history[:, history.shape[1] - L:]
        fill = history.new_full((history.shape[0], L - history.shape[1]), HISTORY_PAD)
        return torch.cat([fill, history], 1)

    def user_vectors_from_history(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 left-padded histories (HISTORY_PAD = -1), most recent last -> (B, d).

        Longer histories keep their last ``max_history`` items; shorter ones are left-padded.
        Works from the saved weights alone (``load_cf``); call ``eval()`` first for inference.
        """
        history = self._fit_length(history)                                        # (B, L)
        pad = history < 0                                                          # (B, L)
        x = self.item_emb((history + 1).clamp(min=0)) * math.sqrt(self.dim)       # (B, L, d)
        x = x + self.pos_emb.weight.unsqueeze(0)                                   # (B, L, d)
        x = self.drop(x) * (~pad).unsqueeze(-1)                                    # padding -> 0
        blocked = self._mask(pad)                                                  # (B*H, L, L)
        for k, block in enumerate(self.blocks):
            x = block(x, blocked, last_only=k == len(self.blocks) - 1)             # last: (B, 1, d)
        return self.final_norm(x[:, -1])                                           # (B, d)

    def pair_vectors(self, batch):
        if batch.history is None:
            raise ValueError("SASRec needs batch.history (the users' earlier positive items); "
                             "load the data with histories")
        return self.user_vectors_from_history(batch.history), self.item_emb(batch.items + 1)

    def item_vectors(self):
        return self.item_emb.weight[1:]


def build_model(name: str, num_users: int, num_items: int, dim: int, *, edges: torch.Tensor | None = None,
                lightgcn_layers: int = 2, max_history: int = 25, sasrec_blocks: int = 2,
                sasrec_heads: int = 1, sasrec_dropout: float = 0.2) -> CFModel:
    """A freshly initialised model by name (uses the global torch RNG); LightGCN needs ``edges``."""
    if name == "mf":
        return MF(num_users, num_items, dim)
    if name == "lightgcn":
        if edges is None:
            raise ValueError("LightGCN needs edges: the (2, E) (user, item) pairs of the train positives")
        return LightGCN(num_users, num_items, dim, edges, layers=lightgcn_layers)
    if name == "sasrec":
        return SASRec(num_users, num_items, dim, max_history=max_history, blocks=sasrec_blocks,
                      heads=sasrec_heads, dropout=sasrec_dropout)
    raise ValueError(f"unknown CF model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
