"""BDLM (arXiv 2311.03778): an information-sharing module between the LLM and a domain model.

One **shared store** of user and item embeddings E = (E_user, E_item) is read and written by both models:

    LLM side     the prompt's user and item slots (CoLLM's ``collm-<domain>`` templates) get proj(E[u]) and
                 proj(E[i]) as input embeddings; proj (Linear(d_cf -> d_model)) trains in the engine, and the
                 gradients of the rows read, dL/dE[u] and dL/dE[i], are pushed back to the store, which applies
                 them (``StoreShard.commit``) once every rank pushed its step
    domain side  LightGCN on E as its layer-0 tables: S = mean_{k=0..K} A_hat^k E (cora.cf.models), trained
                 between the LLM's epochs (``domain_phase``), writing E back; logit(u, i) = <S_u, S_i>

and the two teach each other (mutual learning):

    L_llm    = BCE(y_llm, label) + mutual_weight        * BCE(y_llm, sigmoid(y_dom))   per train sample
    L_domain = BCE(y_dom, label) + domain_mutual_weight * BCE(y_dom, sigmoid(y_llm))   per train pair the LLM scored

where y_dom = <T_u, T_i> with T the domain model's propagated tables at the end of its last phase (the
"teacher" tables, kept in the store), and y_llm the LLM's logit last recorded for that (user, item) pair
during its phase. At inference each model scores alone: the LLM from proj and E, the domain model from T.

The store's update rule for the rows the LLM touched in a step (lazy Adam: only those rows move, each
with its own step count t for the bias correction)::

    g   = (1 / world) sum_ranks sum_micro-batches dL/dE[id]      (summed in rank order: deterministic)
    m   = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = t + 1
    E  -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)          ('sgd': E -= lr g)

This module is the pure part (no Ray): the config, the update, one shard's state and the domain phase;
``cluster/store.py`` serves shards as Ray actors, ``cora.methods.bdlm`` is the LLM side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

BETAS, EPS = (0.9, 0.999), 1e-8


@dataclass
class BDLMConfig:
    """BDLM's shared store, its two sides and their mutual learning (method=bdlm)."""

    store_lr: float = 1e-3
    """Learning rate of the store's update of the rows the LLM read (its own optimiser, not the engine's)."""
    store_optimizer: Literal["adam", "sgd"] = "adam"
    """'adam': lazy Adam (betas 0.9, 0.999; a step count per row); 'sgd': plain gradient steps."""
    store_shards: int = 1
    """Store actors per table (user, item), each owning a contiguous id range."""
    mutual_weight: float = 0.1
    """LLM side: weight of BCE towards the domain model's probability for the same (user, item)."""
    domain_epochs: int = 1
    """Domain side: LightGCN epochs over the train split after each LLM epoch (0: no domain phase)."""
    domain_lr: float = 1e-3
    """Domain side: Adam learning rate (a fresh Adam per phase)."""
    domain_batch_size: int = 1024
    """Domain side: train rows per LightGCN step."""
    domain_mutual_weight: float = 0.1
    """Domain side: weight of BCE towards the LLM's probability recorded for the same pair."""
    domain_layers: int | None = None
    """LightGCN propagation layers K; None: the CF run's (data.cf_dir) when it is a LightGCN run, else 2."""

    def validate(self) -> list[str]:
        problems = []
        for k in ("store_lr", "domain_lr"):
            if not getattr(self, k) > 0:
                problems.append(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("mutual_weight", "domain_mutual_weight", "domain_epochs"):
            if not getattr(self, k) >= 0:
                problems.append(f"{k} must be >= 0 (0 turns it off), got {getattr(self, k)}")
        for k in ("store_shards", "domain_batch_size"):
            if getattr(self, k) < 1:
                problems.append(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.domain_layers is not None and self.domain_layers < 0:
            problems.append(f"domain_layers must be >= 0 or null (the CF run's), got {self.domain_layers}")
        return problems


# ---------------------------------------------------------------------------- the update rule

def apply_update(table: np.ndarray, m: np.ndarray, v: np.ndarray, t: np.ndarray, rows: np.ndarray,
                 grads: np.ndarray, lr: float, optimizer: str = "adam") -> None:
    """Update ``table[rows]`` (rows: unique local indices (k,), grads (k, d)) in place; lazy Adam keeps its
    moments ``m``, ``v`` (n, d) and step counts ``t`` (n,) per row."""
    if optimizer == "sgd":
        table[rows] -= np.float32(lr) * grads
        return
    b1, b2 = BETAS
    t[rows] += 1
    m[rows] = b1 * m[rows] + (1 - b1) * grads
    v[rows] = b2 * v[rows] + (1 - b2) * grads * grads
    step = t[rows].astype(np.float64)[:, None]                                   # (k, 1)
    m_hat, v_hat = m[rows] / (1 - b1 ** step), v[rows] / (1 - b2 ** step)
    table[rows] -= (lr * m_hat / (np.sqrt(v_hat) + EPS)).astype(np.float32)


def sum_pushes(pushes: list[tuple[np.ndarray, np.ndarray]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids (k,), summed gradients (k, d) float32) of (ids, grads) pushes, added in the given order."""
    if not pushes:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids = np.concatenate([p[0] for p in pushes]).astype(np.int64)
    grads = np.concatenate([p[1] for p in pushes]).astype(np.float32).reshape(len(ids), dim)
    unique, where = np.unique(ids, return_inverse=True)
    total = np.zeros((len(unique), dim), np.float32)
    np.add.at(total, where, grads)                                  # sequential: the same sum every time
    return unique, total


class StoreShard:
    """The rows [lo, hi) of one table ('user' or 'item'): the shared embeddings E, the optimiser's state,
    the domain model's propagated (teacher) rows T and, on user shards, the LLM's logit recorded per
    (user, item) pair of its users. Synchronous: a step's pushes are applied once all ``world`` ranks
    pushed it, in rank order, so the result does not depend on the order they arrive in; ``version`` is the
    last step applied."""

    def __init__(self, key: str, lo: int, hi: int, base: np.ndarray, teacher: np.ndarray, world: int,
                 lr: float, optimizer: str = "adam"):
        self.key, self.lo, self.hi, self.world, self.lr, self.optimizer = key, lo, hi, world, lr, optimizer
        self.reset(base, teacher)

    def reset(self, base: np.ndarray, teacher: np.ndarray) -> None:
        n = self.hi - self.lo
        if base.shape[0] != n or teacher.shape != base.shape:
            raise ValueError(f"store shard {self.key} {self.lo}..{self.hi - 1}: got tables of shapes {base.shape} "
                             f"and {teacher.shape} for {n} rows")
        self.table = np.array(base, dtype=np.float32)
        self.teacher = np.array(teacher, dtype=np.float32)
        self.m, self.v = np.zeros_like(self.table), np.zeros_like(self.table)
        self.t = np.zeros(n, np.int64)
        self.records: dict[tuple[int, int], float] = {}
        self.version = 0
        self.pending: dict[int, tuple] = {}

    def _local(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < self.lo) | (ids >= self.hi)
        if bad.any():
            raise ValueError(f"{self.key} id {int(ids[bad][0])} is outside this store shard's range "
                             f"{self.lo}..{self.hi - 1}")
        return ids - self.lo

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(E rows (k, d), T rows (k, d), version) of global ids."""
        local = self._local(ids)
        return self.table[local], self.teacher[local], self.version

    def push(self, step: int, rank: int, ids: np.ndarray, grads: np.ndarray, records=None) -> bool:
        """Rank ``rank``'s gradients of step ``step`` for its rows ``ids`` (k,) and, optionally, its records
        (users, items, logits) of this shard's users; returns whether the step was applied (the last rank)."""
        if step != self.version + 1:
            raise ValueError(f"store shard {self.key} {self.lo}..{self.hi - 1}: push of step {step} from rank {rank}, "
                             f"but the store is at step {self.version} (expects step {self.version + 1}); were the "
                             f"ranks restored from different checkpoints?")
        if rank in self.pending or not 0 <= rank < self.world:
            raise ValueError(f"store shard {self.key}: rank {rank} pushed step {step} twice, or is not one of the "
                             f"{self.world} ranks")
        self.pending[rank] = (self._local(ids), np.asarray(grads, np.float32), records)
        if len(self.pending) < self.world:
            return False
        self.commit(step)
        return True

    def commit(self, step: int) -> None:
        """Apply the pending pushes of ``step`` in rank order: the mean over ranks of the summed gradients."""
        order = [self.pending[r] for r in sorted(self.pending)]
        rows, total = sum_pushes([(ids, g) for ids, g, _ in order], self.table.shape[1])
        apply_update(self.table, self.m, self.v, self.t, rows, total / np.float32(self.world), self.lr,
                     self.optimizer)
        for _, _, rec in order:
            if rec is not None:
                for u, i, s in zip(*rec):
                    self.records[(int(u), int(i))] = float(s)
        self.pending, self.version = {}, step

    def assign(self, base: np.ndarray, teacher: np.ndarray) -> None:
        """The domain phase's result: new E rows and teacher rows for the whole range (optimiser state kept)."""
        self.table[:], self.teacher[:] = base, teacher

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, logits) of the recorded pairs, sorted by (user, item)."""
        keys = sorted(self.records)
        users = np.array([k[0] for k in keys], np.int64)
        items = np.array([k[1] for k in keys], np.int64)
        return users, items, np.array([self.records[k] for k in keys], np.float32)

    def snapshot(self) -> dict[str, np.ndarray]:
        users, items, logits = self.recorded()
        return {"table": self.table.copy(), "m": self.m.copy(), "v": self.v.copy(), "t": self.t.copy(),
                "teacher": self.teacher.copy(), "rec_users": users, "rec_items": items, "rec_logits": logits,
                "version": np.array([self.version], np.int64)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        """The state of a ``snapshot`` (pending pushes dropped)."""
        for k in ("table", "m", "v", "teacher"):
            setattr(self, k, np.array(state[k], dtype=np.float32))
        self.t = np.array(state["t"], dtype=np.int64)
        self.records = {(int(u), int(i)): float(s) for u, i, s in
                        zip(state["rec_users"], state["rec_items"], state["rec_logits"])}
        self.version, self.pending = int(np.asarray(state["version"]).reshape(-1)[0]), {}


# ---------------------------------------------------------------------------- initial tables

def initial_tables(cf_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """{key: (E (n, d), T (n, d))} from a CF run: E is a LightGCN run's layer-0 tables (model.safetensors),
    any other model's vector tables; T, the domain model's scores before its first phase, the run's vector
    tables (a LightGCN run's propagated ones), so the first teacher is the CF model as trained. Also
    "layers": the run's LightGCN K (None for other models)."""
    from cora.cf.store import read_embeddings
    from cora.fileio import open_fs
    cf_dir = cf_dir.rstrip("/")
    fs, path = open_fs(f"{cf_dir}/cf.json")
    with fs.open_input_stream(path) as f:
        meta = json.loads(f.read())
    vectors = {}
    for key in ("user", "item"):
        fs, path = open_fs(f"{cf_dir}/{key}_embeddings.parquet")
        with fs.open_input_file(path) as f:
            vectors[key] = read_embeddings(f)
    base = dict(vectors)
    layers = None
    if meta.get("model") == "lightgcn":
        from safetensors.torch import load
        fs, path = open_fs(f"{cf_dir}/model.safetensors")
        with fs.open_input_stream(path) as f:
            state = load(f.read())
        base = {k: state[f"{k}_emb.weight"].float().numpy() for k in ("user", "item")}
        layers = int(meta.get("config", {}).get("lightgcn_layers", 2))
    return {"user": (base["user"], vectors["user"]), "item": (base["item"], vectors["item"]), "layers": layers}


# ---------------------------------------------------------------------------- the domain side

@dataclass
class DomainResult:
    """One domain phase: the new E and T tables, its mean loss, and the domain model's valid/test metrics."""

    user: np.ndarray
    item: np.ndarray
    teacher_user: np.ndarray
    teacher_item: np.ndarray
    loss: float
    valid: dict
    test: dict


def domain_phase(user: np.ndarray, item: np.ndarray, data, records: tuple, cfg: BDLMConfig, layers: int,
                 seed: int) -> DomainResult:
    """``cfg.domain_epochs`` epochs of LightGCN (K = ``layers``) with E = (user, item) as its layer-0 tables on
    ``data.train`` (a cora.cf.data.CFData), loss BCE(label) + domain_mutual_weight x BCE towards sigmoid of the
    LLM's recorded logit (``records``: (users, items, logits), pairs without one get no mutual term); a fresh
    Adam (domain_lr), shuffled by a generator seeded with ``seed``. Leaves the global torch RNG as it was."""
    import torch.nn.functional as F

    from cora.cf.models import CFBatch, LightGCN
    from cora.cf.train import evaluate_scores, predict, train_edges
    train = data.train
    target, has = _recorded_logits(train, records, data.num_items)            # (N,), (N,) bool
    with torch.random.fork_rng(devices=[]):
        model = LightGCN(data.num_users, data.num_items, user.shape[1], train_edges(train), layers)
    with torch.no_grad():
        model.user_emb.weight.copy_(torch.from_numpy(user))
        model.item_emb.weight.copy_(torch.from_numpy(item))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.domain_lr)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    model.train()
    for _ in range(cfg.domain_epochs):
        perm = torch.randperm(len(train), generator=gen)
        for s in range(0, len(perm), cfg.domain_batch_size):
            idx = perm[s:s + cfg.domain_batch_size]                                     # (B,)
            logit = model.score(CFBatch(train.users[idx], train.items[idx]))            # (B,)
            loss = F.binary_cross_entropy_with_logits(logit, train.labels[idx])
            if cfg.domain_mutual_weight and has[idx].any():
                mine = has[idx]
                loss = loss + cfg.domain_mutual_weight * F.binary_cross_entropy_with_logits(
                    logit[mine], torch.sigmoid(target[idx][mine]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
    model.eval()
    valid = evaluate_scores(data.valid, predict(model, data.valid, 8192))
    test = evaluate_scores(data.test, predict(model, data.test, 8192), subsets=True)
    with torch.no_grad():
        prop = model.propagate()                                                        # (U + I, d)
    nu = data.num_users
    return DomainResult(model.user_emb.weight.detach().numpy().copy(), model.item_emb.weight.detach().numpy().copy(),
                        prop[:nu].numpy().copy(), prop[nu:].numpy().copy(), total / max(count, 1), valid, test)


def _recorded_logits(train, records: tuple, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the LLM's recorded logit of each train row (N,), whether it has one (N,) bool)."""
    users, items, logits = (np.asarray(r) for r in records)
    keys = users.astype(np.int64) * num_items + items.astype(np.int64)                 # sorted (by user, item)
    want = train.users.numpy() * num_items + train.items.numpy()                       # (N,)
    at = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
    has = (keys[at] == want) if len(keys) else np.zeros(len(want), bool)
    target = np.where(has, logits[at] if len(keys) else 0.0, 0.0).astype(np.float32)
    return torch.from_numpy(target), torch.from_numpy(has)


def teacher_logits(teacher_user: torch.Tensor, teacher_item: torch.Tensor) -> torch.Tensor:
    """The domain model's logits <T_u, T_i> of aligned rows (B, d), (B, d) -> (B,)."""
    return (teacher_user.float() * teacher_item.float()).sum(-1)

