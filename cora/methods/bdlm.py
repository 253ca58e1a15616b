"""BDLM (arXiv 2311.03778) as a method: the LLM side of the shared store (the whole method in ``cora.bdlm``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..bdlm import BDLMConfig, domain_phase, teacher_logits
from .base import Method


class BDLM(Method):
    """BDLM's LLM side (arXiv 2311.03778; the whole in ``cora.bdlm``): CoLLM's prompt with a user and an item
    slot (``collm-<domain>``), whose input embeddings are proj(E[u]) and proj(E[i]), E the shared store's rows
    (``cluster.store``; in one process, without a store, the tables are the buffers ``store_user`` and
    ``store_item`` that an export holds). proj = Linear(d_cf -> d_model) trains in the engine; the rows read
    are leaves whose gradients are pushed to the store after each step (``after_step``), which updates them.
    Loss: BCE on the "Yes" logit + mutual_weight x BCE towards sigmoid of the domain model's logit <T_u, T_i>.
    After each epoch rank 0 runs the domain phase (LightGCN on the store, ``cora.bdlm.domain_phase``) and
    writes the store (``end_epoch``), before the LLM is evaluated with it. The LLM stays frozen."""

    name, uses_cf, adapter = "bdlm", False, "lora"
    template = "collm-"

    def __init__(self, cfg: BDLMConfig | None = None, num_users: int = 0, num_items: int = 0):
        self.cfg, self.num_users, self.num_items = cfg or BDLMConfig(), num_users, num_items
        self.store = None          # cluster.store.StoreClient in the workers (``connect``)
        self.version = 0           # the last step pushed to the store: reads wait until it is applied
        self.rank, self.world, self.context = 0, 1, {}
        self._leaves: dict[str, tuple] = {}
        self._grads: dict[str, list] = {"user": [], "item": []}
        self._records: list[tuple] = []
        self._teacher: torch.Tensor | None = None
        self._data = None

    def section(self):
        from dataclasses import asdict
        return dict(asdict(self.cfg), num_users=self.num_users, num_items=self.num_items)

    def attach(self, model, injection, generator, user_dim, item_dim):
        problems = self.cfg.validate()
        if problems:
            raise ValueError("invalid bdlm config: " + "; ".join(problems))
        if user_dim != item_dim:
            raise ValueError(f"BDLM maps users and items with one projection: their CF widths must agree, got user "
                             f"{user_dim}, item {item_dim}")
        model.injection, model.generator = None, None
        model.bdlm_proj = nn.Linear(user_dim, model.llm.get_input_embeddings().embedding_dim)
        model.register_buffer("store_user", torch.zeros(self.num_users, user_dim))
        model.register_buffer("store_item", torch.zeros(self.num_items, item_dim))

    def trainable(self, model):
        return list(model.bdlm_proj.parameters())

    def exported(self, model):
        named = {n: p for n, p in model.named_parameters() if n.startswith("bdlm_proj.")}
        if self.store is None:
            return dict(named, store_user=model.store_user, store_item=model.store_item)
        tables = self.store.tables(self.version)
        return dict(named, store_user=torch.from_numpy(tables["user"]), store_item=torch.from_numpy(tables["item"]))

    # ---------------------------------------------------------------- the store
    def connect(self, model, store, rank, world, context):
        """Use ``store`` (every rank; rank 0 resets it to the CF run's tables: a fresh start unless a checkpoint
        is then restored into it). ``context``: {"data_dir", "cf_dir", "seed"} of the domain phase."""
        self.store, self.rank, self.world, self.context = store, rank, world, context
        self.num_users, self.num_items = store.sizes["user"], store.sizes["item"]
        if rank == 0:
            store.reset()
        self.version = 0
        _barrier()

    def state(self, model):
        if self.store is None:
            return {}
        snapshot = self.store.snapshot(self.version)
        return {f"store.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in snapshot.items()}

    def load_state(self, model, tensors):
        if self.store is None:                  # one process (cora eval --checkpoint): the tables only
            model.store_user, model.store_item = tensors["store.user.table"], tensors["store.item.table"]
            return
        state = {k[len("store."):]: t.numpy() for k, t in tensors.items()}
        if self.rank == 0:
            self.store.load(state)
        self.version = int(state["user.version"][0])
        _barrier()

    def _read(self, model, key: str, ids: torch.Tensor, device, grad: bool):
        """(E rows (B, d), T rows (B, d) or None) of the batch's ids; with ``grad`` the unique rows read are kept
        as leaves whose gradients ``after_backward`` collects."""
        if self.store is None:
            table = model.store_user if key == "user" else model.store_item
            return table[ids.to(table.device)], None
        unique, where = np.unique(ids.cpu().numpy().astype(np.int64), return_inverse=True)
        rows, teacher = self.store.read(key, unique, self.version)                 # (k, d) each
        leaf = torch.from_numpy(rows).to(device).requires_grad_(grad)
        if grad:
            self._leaves[key] = (unique, leaf)
        at = torch.from_numpy(where.reshape(-1)).to(device)
        return leaf[at], torch.from_numpy(teacher).to(device)[at]

    def inputs(self, model, batch):
        if batch.slots is None or batch.slots.shape[-1] != 2 or batch.users is None or batch.items is None:
            raise ValueError("BDLM needs each prompt's user and item slot positions (batch.slots (B, 2); encode with "
                             "a collm-<domain> template) and the batch's user and item ids (batch.users, batch.items)")
        embeds = model.llm.get_input_embeddings()(batch.input_ids)                   # (B, T, d)
        grad = self.store is not None and torch.is_grad_enabled()
        u, tu = self._read(model, "user", batch.users, embeds.device, grad)          # (B, d_cf)
        i, ti = self._read(model, "item", batch.items, embeds.device, grad)
        self._teacher = None if tu is None else teacher_logits(tu, ti)               # (B,)
        cf = torch.stack([u, i], dim=1)                                              # (B, 2, d_cf)
        mapped = model.bdlm_proj(cf.to(model.bdlm_proj.weight.dtype)).to(embeds.dtype)   # (B, 2, d)
        index = batch.slots.to(embeds.device).unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        return {"inputs_embeds": embeds.scatter(1, index, mapped)}

    def loss(self, model, batch, hidden, logits):
        from ..scoring import bce_loss
        loss = super().loss(model, batch, hidden, logits)
        if self._teacher is not None and self.cfg.mutual_weight:
            teacher = torch.sigmoid(self._teacher.detach())                          # (B,) the domain model's
            loss = loss + self.cfg.mutual_weight * bce_loss(logits, teacher, batch.weights)
        if self.store is not None:                 # the LLM's scores, for the domain phase's mutual term
            real = _real(batch)
            self._records.append((batch.users.cpu().numpy()[real], batch.items.cpu().numpy()[real],
                                  logits.detach().float().cpu().numpy()[real]))
        return loss

    def after_backward(self, model, batch):
        real = _real(batch)
        for key, (ids, leaf) in self._leaves.items():
            used = np.unique((batch.users if key == "user" else batch.items).cpu().numpy()[real])
            keep = np.isin(ids, used)                     # rows of padding samples only: no gradient, no update
            if leaf.grad is not None and keep.any():
                self._grads[key].append((ids[keep], leaf.grad.detach().float().cpu().numpy()[keep]))
        self._leaves = {}

    def after_step(self, model, step):
        if self.store is None:
            return
        d = self.store.dim
        grads = {k: (np.concatenate([g[0] for g in v]) if v else np.zeros(0, np.int64),
                     np.concatenate([g[1] for g in v]) if v else np.zeros((0, d), np.float32))
                 for k, v in self._grads.items()}
        records = tuple(np.concatenate([r[j] for r in self._records]) for j in range(3)) if self._records else None
        self.store.push(step, self.rank, grads, records)
        self.version = step
        self._grads, self._records = {"user": [], "item": []}, []

    # ---------------------------------------------------------------- the domain side
    def end_epoch(self, model, epoch):
        """The domain phase (rank 0; the others wait): LightGCN on the store for bdlm.domain_epochs epochs, its
        valid and test metrics; returns {"epoch", "loss", "valid", "test"} on every rank."""
        if self.store is None or not self.cfg.domain_epochs:
            return None
        record = None
        if self.rank == 0:
            tables = self.store.tables(self.version)
            result = domain_phase(tables["user"], tables["item"], self._domain_data(),
                                  self.store.recorded(self.version), self.cfg, self._layers(),
                                  self.context.get("seed", 0) + epoch)
            self.store.assign({"user": result.user, "item": result.item, "teacher_user": result.teacher_user,
                               "teacher_item": result.teacher_item}, self.version)
            record = {"epoch": epoch, "loss": result.loss, "valid": result.valid, "test": result.test}
        return _broadcast(record)

    def _domain_data(self):
        if self._data is None:
            from ..cf.data import load_data
            self._data = load_data(self.context["data_dir"])[0]
        return self._data

    def _layers(self) -> int:
        if self.cfg.domain_layers is not None:
            return self.cfg.domain_layers
        from ..cf.store import read_meta
        meta = read_meta(self.context["cf_dir"])
        return int(meta["config"].get("lightgcn_layers", 2)) if meta.get("model") == "lightgcn" else 2

    def summary(self, records):
        if not records:
            return {}
        best = max(records, key=lambda r: r["valid"]["auc"])
        size = (self.num_users + self.num_items) * (self.store.dim if self.store is not None else 0)
        return {"domain_valid": best["valid"], "domain_test": best["test"], "domain_best_epoch": best["epoch"],
                "domain_parameters": size,
                "domain_evaluations": [{"epoch": r["epoch"], "loss": r["loss"], "valid_auc": r["valid"]["auc"],
                                        "test_auc": r["test"]["auc"]} for r in records]}


def _real(batch) -> np.ndarray:
    """(B,) bool: the batch's real samples (not the epoch plan's weight-0 padding)."""
    if batch.weights is None:
        return np.ones(batch.input_ids.shape[0], bool)
    return batch.weights.cpu().numpy() > 0


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
