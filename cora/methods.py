"""The recommendation methods that share one frozen LLM, one prompt format, the trainer and the eval: a
strategy object per method (as peft has one class per adapter type), so that the trainer, the data
actors, checkpoints, resume and evaluation never branch on the method.

A method says:

- ``attach``: what it adds to the frozen LLM inside ``CoRAModel`` (an injection, a generator, ...);
- ``trainable``: which of those parameters train;
- ``inputs``: how a ``Batch`` becomes the backbone's inputs (CoRA also installs this batch's A here);
- ``name``: what exports and checkpoints record (``"method"``) so that the model can be rebuilt.

Every method is scored the same way (the raw "Yes" logit at the answer position, ``CoRAModel.forward``).

    cora     per-sample A from the collaborative weights generator (CF user + item embeddings), P trained
    tallrec  ordinary LoRA (a learned A and P per module) on the same prompt: no CF input (TALLRec)
    collm    CF embeddings mapped into two token slots of CoLLM's prompt; the mapping trains, the LoRA of
             its TALLRec stage is frozen (one process so far: not yet a `cora train` method)

The no-injection baseline is not a method: it is any method's model before training (P = 0), which
``cora train`` scores once as ``no_injection_test``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

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

    def validate(self) -> list[str]:
        return [] if self.mid_times >= 1 else [f"mid_times must be >= 1, got {self.mid_times}"]


class CoLLM(Method):
    """CoLLM's stage 2: the prompt carries one slot for the user and one for the target item (its
    ``collm-<domain>`` templates); their input embeddings are replaced by the CF user and item
    embeddings mapped by one shared MLP (Linear(d_cf, mid x d_cf) -> ReLU -> Linear(-> d_model)), which is
    what trains. The LoRA A and P come from its TALLRec stage and stay frozen."""

    name, uses_cf, adapter = "collm", True, "lora"
    template = "collm-"

    def __init__(self, cfg: CoLLMConfig | None = None):
        self.cfg = cfg or CoLLMConfig()

    def attach(self, model, injection, generator, user_dim, item_dim):
        super().attach(model, injection, generator, user_dim, item_dim)
        if user_dim != item_dim:
            raise ValueError(f"CoLLM maps users and items with one MLP: their CF widths must agree, got user "
                             f"{user_dim}, item {item_dim}")
        width = model.llm.get_input_embeddings().embedding_dim
        mid = user_dim * self.cfg.mid_times
        model.mapper = nn.Sequential(nn.Linear(user_dim, mid), nn.ReLU(), nn.Linear(mid, width))
        for p in model.injection.parameters():        # the TALLRec stage's LoRA, frozen in this stage
            p.requires_grad_(False)

    def trainable(self, model):
        return list(model.mapper.parameters())

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


METHODS: dict[str, type[Method]] = {m.name: m for m in (CoRA, TALLRec, CoLLM)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()


def method_of(config: dict) -> str:
    """The method a saved model config names (exports and checkpoints from before methods existed name
    none: their ``injection.adapter`` says it, 'lora' being TALLRec)."""
    if config.get("method"):
        return config["method"]
    return "tallrec" if config.get("injection", {}).get("adapter") == "lora" else "cora"
