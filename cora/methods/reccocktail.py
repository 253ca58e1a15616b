"""RecCocktail (arXiv 2502.08271): two TALLRec LoRAs frozen and mixed by merge weights learned on unlabeled
target prompts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..injection import Injection, MergeVariant
from .base import Method, answer_entropy, yes_no_entropy
from .collm import _injection_params, _load_lora, read_lora


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
