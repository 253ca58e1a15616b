"""The recommendation methods that share one frozen LLM, one prompt format, the trainer and the eval: a
strategy object per method (as peft has one class per adapter type), so that the trainer, the data
actors, checkpoints, resume and evaluation never branch on the method.

A method says:

- ``attach``: what it adds to the frozen LLM inside ``CoRAModel`` (an injection, a generator, ...);
- ``trainable``: which of those parameters train;
- ``inputs``: how a ``Batch`` becomes the backbone's inputs (CoRA also installs this batch's A here);
- ``loss``: the training loss (BCE on the "Yes" logit; RecCocktail's merge: the answer token's entropy);
- ``exported``: the tensors an export holds (the trainable ones, and any frozen ones the method
  brought in, such as CoLLM's stage-1 LoRA), so that an export alone rebuilds the model;
- ``state``/``load_state``: non-trained state a checkpoint holds (Laser's item table, BDLM's store);
- ``connect``, ``after_backward``, ``after_step``, ``end_epoch``, ``summary``: the training loop's hooks, for
  state outside the engine (BDLM's shared store, its gradients and its domain phase); no-ops for the others;
- ``name``: what exports and checkpoints record (``"method"``) so that the model can be rebuilt
  (``make_method`` builds the strategy from such a saved config, with its section, e.g. ``collm``).

Every method is scored the same way (the raw "Yes" logit at the answer position, ``CoRAModel.forward``).

    cora     per-sample A from the collaborative weights generator (CF user + item embeddings), P trained
    tallrec  ordinary LoRA (a learned A and P per module) on the same prompt: no CF input (TALLRec)
    collm    CF embeddings mapped into two token slots of CoLLM's prompt; the mapping trains, the LoRA of
             its TALLRec stage (a tallrec run's export, ``collm.lora_from``) is loaded and frozen
    reccocktail  two TALLRec LoRAs (source domains' "base spirit", target's "ingredient") frozen and mixed;
             the merge weights train on unlabeled target prompts (answer-token entropy)
    laser    an M-Former prefix over the history's CF item embeddings and a suffix token; scored by the cosine
             between the user's and the item's encodings
    bdlm     user and item ID slots whose embeddings come from a store shared with a domain model (LightGCN):
             proj(E[u]), proj(E[i]); proj trains, the rows read are updated in the store; the domain model
             trains on the same store between epochs, each model learning from the other's scores (cora.bdlm)

The no-injection baseline is not a method: it is any method's model before training (P = 0), which
``cora train`` scores once as ``no_injection_test``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bdlm import BDLMConfig, teacher_logits
from .generator import CollaborativeWeightsGenerator, GeneratorConfig
from .injection import Injection, InjectionConfig
from .laser import MFormer, MFormerConfig


class Method:
    """Base strategy; subclasses set ``name``, ``uses_cf`` and ``adapter`` and override what differs."""

    name: ClassVar[str] = ""
    uses_cf: ClassVar[bool] = False
    """Whether the scores depend on the CF embeddings of the batch."""
    adapter: ClassVar[str] = "cora"
    """The injection variant (``InjectionConfig.adapter``) the method uses."""
    history_items: int = 0
    """History items whose CF embeddings each batch must carry (``Batch.history_emb``; Laser's M-Former)."""
    item_refresh_epochs: int = 0
    """> 0: the method scores against a table of item encodings (``model.item_table``) that the trainer
    refreshes at the start and after each of the first this-many epochs, then keeps (Laser)."""
    template: ClassVar[str] = ""
    """Prefix of the prompt template family (``cora/prompt_templates.json``): "" the TALLRec-style text
    prompt of the domain, "collm-" the one with embedding slots."""

    def attach(self, model: nn.Module, injection: InjectionConfig, generator: GeneratorConfig | None,
               user_dim: int, item_dim: int) -> None:
        """Add the method's modules to ``model`` (whose ``llm`` is frozen)."""
        model.injection = Injection(model.llm, replace(injection, adapter=self.adapter))
        model.generator = None

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.injection.parameters())

    def inputs(self, model: nn.Module, batch) -> dict:
        """The backbone's keyword inputs for ``batch``."""
        return {"input_ids": batch.input_ids}

    def score(self, model: nn.Module, batch, hidden: torch.Tensor) -> torch.Tensor:
        """Each sample's score from the hidden state read at its answer position (B, d) -> (B,): the raw
        "Yes" logit."""
        return model.yes_logit(hidden)

    def loss(self, model: nn.Module, batch, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch from the answer position's hidden states (B, d) and the scores (B,):
        BCE-with-logits against the labels (weight-0 padding excluded)."""
        from .scoring import bce_loss
        if batch.labels is None:
            raise ValueError("batch has no labels; this method's loss needs them")
        return bce_loss(logits, batch.labels, batch.weights)

    def exported(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The tensors an export writes (by ``model.named_parameters()`` name): the trainable ones."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def section(self) -> dict | None:
        """The method's own config section as an export records it (None: it has none)."""
        return None

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Non-trained tensors a checkpoint must hold to resume exactly (Laser's item table); the same on
        every rank."""
        return {}

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            model.get_buffer(name).copy_(t)

    # the training loop's hooks (no-ops but for methods with state outside the engine: BDLM's shared store)
    def connect(self, model: nn.Module, store, rank: int, world: int, context: dict) -> None:
        """In every worker, before the restore: the method's service (``trainer.recipe.Handover.store``)."""

    def after_backward(self, model: nn.Module, batch) -> None:
        """After each micro-batch's backward, on every rank."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimiser step ``step`` (1-based), on every rank, before anything is saved."""

    def end_epoch(self, model: nn.Module, epoch: int) -> dict | None:
        """After a whole epoch was trained, before it is evaluated and saved, on every rank: a record of what the
        method did (the same on every rank; kept in the loop state), or None."""
        return None

    def summary(self, records: list[dict]) -> dict:
        """What metrics.json adds from the ``end_epoch`` records."""
        return {}


class CoRA(Method):
    name, uses_cf, adapter = "cora", True, "cora"

    def attach(self, model, injection, generator, user_dim, item_dim):
        super().attach(model, injection, generator, user_dim, item_dim)
        inj = model.injection
        model.generator = CollaborativeWeightsGenerator(generator or GeneratorConfig(), user_dim, item_dim,
                                                        inj.widths, injection.rank, inj.num_layers,
                                                        injection.per_layer)

    def trainable(self, model):
        return super().trainable(model) + list(model.generator.parameters())

    def inputs(self, model, batch):
        model.injection.set_weights(model.generator.weights(batch.user_emb, batch.item_emb))
        return super().inputs(model, batch)


class TALLRec(Method):
    name, uses_cf, adapter = "tallrec", False, "lora"


@dataclass
class CoLLMConfig:
    """CoLLM's mapping of CF embeddings into the LLM's token-embedding space (zyang1580/CoLLM)."""

    mid_times: int = 10
    """Hidden width of the mapping MLP, in multiples of the CF width (CoLLM: proj_mid_times 10)."""
    lora_from: str | None = None
    """CoLLM's first stage: the export directory of a method=tallrec run (RUN/export) whose LoRA A and P are
    loaded and frozen. None: no first stage (the LoRA's P stays zero, so only the mapping acts)."""

    def validate(self) -> list[str]:
        return [] if self.mid_times >= 1 else [f"mid_times must be >= 1, got {self.mid_times}"]


def read_lora(export_dir: str | Path, injection: InjectionConfig, llm_name: str | None = None,
              key: str = "collm.lora_from") -> dict:
    """The LoRA A and P of a TALLRec export (all its tensors, by ``CoRAModel.named_parameters`` name), checked to
    fit ``injection`` (and the LLM ``llm_name``); a ValueError says what does not fit and what to do."""
    from safetensors.torch import load_file
    export_dir = Path(export_dir)
    files = [export_dir / "config.json", export_dir / "adapter.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{key}={str(export_dir)!r} lacks {', '.join(missing)}: point it at the export "
                         f"directory of a method=tallrec run (RUN/export, written at its best validation)")
    saved = json.loads(files[0].read_text())
    if method_of(saved) != "tallrec":
        raise ValueError(f"{key}={str(export_dir)!r} is an export of method {method_of(saved)!r}; it must be a LoRA "
                         f"trained by a method=tallrec run (train one, then point {key} at its RUN/export)")
    problems = []
    if llm_name is not None and saved.get("llm", {}).get("name") != llm_name:
        problems.append(f"llm.name {saved.get('llm', {}).get('name')!r} (this run: {llm_name!r})")
    defaults = InjectionConfig()
    for field in ("rank", "alpha", "targets"):
        mine, theirs = getattr(injection, field), saved.get("injection", {}).get(field, getattr(defaults, field))
        if mine != theirs:
            problems.append(f"injection.{field} {theirs!r} (this run: {mine!r})")
    if problems:
        raise ValueError(f"{key}={str(export_dir)!r} was trained with {'; '.join(problems)}: its LoRA is loaded "
                         f"as is, so set this run's values to the TALLRec run's (or train TALLRec with these)")
    return load_file(str(files[1]))


class CoLLM(Method):
    """CoLLM's stage 2: the prompt carries one slot for the user and one for the target item (its
    ``collm-<domain>`` templates); their input embeddings are replaced by the CF user and item
    embeddings mapped by one shared MLP (Linear(d_cf, mid x d_cf) -> ReLU -> Linear(-> d_model)), which is
    what trains. The LoRA A and P come from its TALLRec stage and stay frozen."""

    name, uses_cf, adapter = "collm", True, "lora"
    template = "collm-"

    def __init__(self, cfg: CoLLMConfig | None = None):
        self.cfg = cfg or CoLLMConfig()

    def section(self):
        return {"mid_times": self.cfg.mid_times, "lora_from": None}    # an export carries the LoRA itself

    def attach(self, model, injection, generator, user_dim, item_dim):
        super().attach(model, injection, generator, user_dim, item_dim)
        if user_dim != item_dim:
            raise ValueError(f"CoLLM maps users and items with one MLP: their CF widths must agree, got user "
                             f"{user_dim}, item {item_dim}")
        width = model.llm.get_input_embeddings().embedding_dim
        mid = user_dim * self.cfg.mid_times
        model.mapper = nn.Sequential(nn.Linear(user_dim, mid), nn.ReLU(), nn.Linear(mid, width))
        if self.cfg.lora_from:                         # the TALLRec stage's LoRA (before ZeRO-3 partitions it)
            _load_lora(model, read_lora(self.cfg.lora_from, injection), "collm.lora_from")
        for p in model.injection.parameters():        # the TALLRec stage's LoRA, frozen in this stage
            p.requires_grad_(False)

    def trainable(self, model):
        return list(model.mapper.parameters())

    def exported(self, model):
        return {**_injection_params(model), **{n: p for n, p in model.named_parameters() if n.startswith("mapper.")}}

    def inputs(self, model, batch):
        if batch.slots is None or batch.slots.shape[-1] != 2:
            got = None if batch.slots is None else tuple(batch.slots.shape)
            raise ValueError(f"CoLLM needs each prompt's user and target-item slot positions (batch.slots of shape "
                             f"(B, 2), got {got}): encode with a collm-<domain> template")
        embeds = model.llm.get_input_embeddings()(batch.input_ids)                   # (B, T, d)
        cf = torch.stack([batch.user_emb, batch.item_emb], dim=1)                    # (B, 2, d_cf)
        mapped = model.mapper(cf.to(model.mapper[0].weight.dtype)).to(embeds.dtype)  # (B, 2, d)
        index = batch.slots.to(embeds.device).unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        return {"inputs_embeds": embeds.scatter(1, index, mapped)}


def _load_lora(model: nn.Module, lora: dict, key: str, index: int | None = None) -> None:
    """Copy a TALLRec export's LoRA A and P into the model's injection (into slot ``index`` of stacked ones)."""
    mine = _injection_params(model)
    shape = lambda p: tuple(p.shape if index is None else p.shape[1:])  # noqa: E731
    want, got = {(n, shape(p)) for n, p in mine.items()}, {(n, tuple(t.shape)) for n, t in lora.items()}
    if want != got:
        raise ValueError(f"{key}: its LoRA tensors do not fit this model (e.g. {sorted(want ^ got)[:3]}); was it "
                         f"trained with the same llm and injection?")
    with torch.no_grad():
        for n, p in mine.items():
            (p if index is None else p[index]).copy_(lora[n])


def _injection_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The injection's LoRA A and P by ``model.named_parameters()`` name (they live in the LLM's layers)."""
    ids = {id(p) for p in model.injection.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


@dataclass
class RecCocktailConfig:
    """RecCocktail's merge (arXiv 2502.08271): two TALLRec LoRAs, mixed by weights learned on unlabeled
    target prompts by minimising the entropy of the answer token."""

    form: Literal["paper", "code"] = "paper"
    """'paper': one global pair l = softmax(w), A = l1 A_g + l2 A_s and P = l1 P_g + l2 P_s; 'code' (the
    authors' code): one pair per injected module, l1 P_g A_g + l2 P_s A_s."""
    base_from: str | None = None
    """The "base spirit": the export (RUN/export) of a method=tallrec run on the source domains' data."""
    ingredient_from: str | None = None
    """The "ingredient": the export of a method=tallrec run on the target domain's data."""
    entropy: Literal["answer", "vocabulary"] = "answer"
    """What the merge minimises. 'answer': the entropy of the model's answer, Bernoulli(sigmoid(yes logit))
    (the score every method here is trained and evaluated on); 'vocabulary': the entropy of the LLM's whole
    next-token distribution at the answer position (the paper's generative form, where a tuned model puts
    its mass on "Yes"/"No"; here the BCE-trained yes row leaves the rest of the vocabulary untrained)."""

    def validate(self) -> list[str]:
        return []


class Merger(nn.Module):
    """The merge weights: ``rows`` logit pairs w, mixed as softmax(w) (l1 + l2 = 1, both in (0, 1))."""

    def __init__(self, rows: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(rows, 2))     # l = (1/2, 1/2) before training

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)


class RecCocktail(Method):
    """RecCocktail's third stage: the base spirit's and the ingredient's LoRAs (two TALLRec exports) loaded
    and frozen, mixed per ``RecCocktailConfig.form``; only the merge weights train, on the target train
    split's prompts without their labels: the loss is the mean entropy of the LLM's next-token distribution
    at the answer position (the first answer token; the paper averages over the first few generated ones)."""

    name, uses_cf, adapter = "reccocktail", False, "lora"

    def __init__(self, cfg: RecCocktailConfig | None = None):
        self.cfg = cfg or RecCocktailConfig()

    def section(self):
        return {"form": self.cfg.form, "entropy": self.cfg.entropy, "base_from": None, "ingredient_from": None}   # an export carries both

    def attach(self, model, injection, generator, user_dim, item_dim):
        from .injection import MergeVariant
        inj = replace(injection, adapter="lora")
        model.injection = Injection(model.llm, inj, variant=MergeVariant(inj.scale, self.cfg.form))
        model.generator = None
        model.merger = Merger(1 if self.cfg.form == "paper" else len(model.injection.modules))
        for index, key in enumerate(("base_from", "ingredient_from")):
            path = getattr(self.cfg, key)
            if path:                                 # before ZeRO-3 partitions them
                _load_lora(model, read_lora(path, injection, key=f"reccocktail.{key}"), f"reccocktail.{key}", index)

    def trainable(self, model):
        return list(model.merger.parameters())

    def exported(self, model):
        return {**_injection_params(model), **{n: p for n, p in model.named_parameters() if n.startswith("merger.")}}

    def inputs(self, model, batch):
        model.injection.variant.set_mix(model.merger())
        return super().inputs(model, batch)

    def loss(self, model, batch, hidden, logits):
        if self.cfg.entropy == "answer":
            return yes_no_entropy(logits, batch.weights)
        return answer_entropy(model.llm.get_output_embeddings()(hidden), batch.weights)


def weighted_mean(per: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of per-sample values (B,) -> (); with ``weights``, over the weighted samples only (the epoch
    plan's weight-0 padding samples count for nothing; all-zero weights give 0)."""
    if weights is None:
        return per.mean()
    w = weights.to(per.device)
    return (per * w).sum() / w.sum().clamp(min=1.0)


def yes_no_entropy(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the answer Bernoulli(sigmoid(logit)) over the batch, (B,) -> (); with
    ``weights``, over the weighted samples only. H = p softplus(-s) + (1 - p) softplus(s), p = sigmoid(s)
    (= -p log p - (1 - p) log(1 - p), stable for any s)."""
    s = logits.float()
    p = torch.sigmoid(s)
    per = p * F.softplus(-s) + (1 - p) * F.softplus(s)
    return weighted_mean(per, weights)


def answer_entropy(vocab_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of softmax(vocab_logits) over the batch, (B, V) -> (); with ``weights``, over the
    weighted samples only (weight-0 padding counts for nothing)."""
    logp = torch.log_softmax(vocab_logits.float(), dim=-1)
    per = -(logp.exp() * logp).sum(-1)
    return weighted_mean(per, weights)


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
        from .scoring import bce_loss
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
            from .bdlm import domain_phase
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
            from .cf.data import load_data
            self._data = load_data(self.context["data_dir"])[0]
        return self._data

    def _layers(self) -> int:
        if self.cfg.domain_layers is not None:
            return self.cfg.domain_layers
        from .cf.store import read_meta
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


METHODS: dict[str, type[Method]] = {m.name: m for m in (CoRA, TALLRec, CoLLM, RecCocktail, Laser, BDLM)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()


def make_method(config: dict, num_items: int | None = None) -> Method:
    """The strategy a config names (a TrainConfig as a dict, an export's or a checkpoint's saved config),
    with its own section (``collm``, ``reccocktail``, ``laser``, ``bdlm``) when it has one; ``num_items``: the item
    table's size for Laser (an export's section records it)."""
    name = method_of(config)
    if name == "laser":
        section = dict(config.get("laser") or {})
        saved = section.pop("num_items", None)
        return Laser(LaserConfig(**section), num_items if num_items is not None else saved or config.get("num_items", 0))
    if name == "collm":
        return CoLLM(CoLLMConfig(**(config.get("collm") or {})))
    if name == "bdlm":
        section = dict(config.get("bdlm") or {})
        users, items = section.pop("num_users", 0), section.pop("num_items", 0)
        return BDLM(BDLMConfig(**section), users, items)
    if name == "reccocktail":
        return RecCocktail(RecCocktailConfig(**(config.get("reccocktail") or {})))
    return get_method(name)


def method_of(config: dict) -> str:
    """The method a saved model config names (exports and checkpoints from before methods existed name
    none: their ``injection.adapter`` says it, 'lora' being TALLRec)."""
    if config.get("method"):
        return config["method"]
    return "tallrec" if config.get("injection", {}).get("adapter") == "lora" else "cora"
