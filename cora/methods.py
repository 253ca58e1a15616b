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
- ``name``: what exports and checkpoints record (``"method"``) so that the model can be rebuilt
  (``make_method`` builds the strategy from such a saved config, with its section, e.g. ``collm``).

Every method is scored the same way (the raw "Yes" logit at the answer position, ``CoRAModel.forward``).

    cora     per-sample A from the collaborative weights generator (CF user + item embeddings), P trained
    tallrec  ordinary LoRA (a learned A and P per module) on the same prompt: no CF input (TALLRec)
    collm    CF embeddings mapped into two token slots of CoLLM's prompt; the mapping trains, the LoRA of
             its TALLRec stage (a tallrec run's export, ``collm.lora_from``) is loaded and frozen
    reccocktail  two TALLRec LoRAs (source domains' "base spirit", target's "ingredient") frozen and mixed;
             the merge weights train on unlabeled target prompts (answer-token entropy)

The no-injection baseline is not a method: it is any method's model before training (P = 0), which
``cora train`` scores once as ``no_injection_test``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from .generator import CollaborativeWeightsGenerator, GeneratorConfig
from .injection import Injection, InjectionConfig


class Method:
    """Base strategy; subclasses set ``name``, ``uses_cf`` and ``adapter`` and override what differs."""

    name: ClassVar[str] = ""
    uses_cf: ClassVar[bool] = False
    """Whether the scores depend on the CF embeddings of the batch."""
    adapter: ClassVar[str] = "cora"
    """The injection variant (``InjectionConfig.adapter``) the method uses."""
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
        return {"form": self.cfg.form, "base_from": None, "ingredient_from": None}   # an export carries both

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
        return answer_entropy(model.llm.get_output_embeddings()(hidden), batch.weights)


def answer_entropy(vocab_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of softmax(vocab_logits) over the batch, (B, V) -> (); with ``weights``, over the
    weighted samples only (weight-0 padding counts for nothing)."""
    logp = torch.log_softmax(vocab_logits.float(), dim=-1)
    per = -(logp.exp() * logp).sum(-1)
    if weights is None:
        return per.mean()
    w = weights.to(per.device)
    return (per * w).sum() / w.sum().clamp(min=1.0)


METHODS: dict[str, type[Method]] = {m.name: m for m in (CoRA, TALLRec, CoLLM, RecCocktail)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()


def make_method(config: dict) -> Method:
    """The strategy a config names (a TrainConfig as a dict, an export's or a checkpoint's saved config),
    with its own section (``collm``) when it has one."""
    name = method_of(config)
    if name == "collm":
        return CoLLM(CoLLMConfig(**(config.get("collm") or {})))
    if name == "reccocktail":
        return RecCocktail(RecCocktailConfig(**(config.get("reccocktail") or {})))
    return get_method(name)


def method_of(config: dict) -> str:
    """The method a saved model config names (exports and checkpoints from before methods existed name
    none: their ``injection.adapter`` says it, 'lora' being TALLRec)."""
    if config.get("method"):
        return config["method"]
    return "tallrec" if config.get("injection", {}).get("adapter") == "lora" else "cora"
