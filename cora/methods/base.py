"""The strategy every recommendation method is (``Method``), the losses the methods share, and ``method_of``.

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
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..generator import GeneratorConfig
from ..injection import Injection, InjectionConfig

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
        from ..scoring import bce_loss
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



def method_of(config: dict) -> str:
    """The method a saved model config names (exports and checkpoints from before methods existed name
    none: their ``injection.adapter`` says it, 'lora' being TALLRec)."""
    if config.get("method"):
        return config["method"]
    return "tallrec" if config.get("injection", {}).get("adapter") == "lora" else "cora"
