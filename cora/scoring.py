"""The CoRA scoring model: frozen LLM + collaborative weights generator + per-sample injection.

    A = G(concat(u, i))                  # (B, d_in, r), per sample
    h = LLM_A(prompt)[answer position]   # (B, d), with y = Wx + (alpha/r) P(dropout(x) A_b) injected
    logit = h . w_yes (+ b_yes)          # (B,): only the "Yes" row of the LM head, never the vocabulary
    loss = BCEWithLogits(logit, label)

Prompts are right-padded: with causal attention a real token never attends to a later pad, so no
attention mask is needed (SDPA can take its causal fast path) and the answer hidden state is read at
index ``length - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cora.generator import GeneratorConfig
from cora.injection import InjectionConfig
from cora.methods import Method, get_method, weighted_mean
from cora.prompts import pad_prompts

FIELDS = ("input_ids", "lengths", "user_emb", "item_emb", "labels", "weights", "slots", "items", "history_emb",
          "history_pad", "users")


@dataclass
class Batch:
    """One training/eval batch, right-padded."""

    input_ids: torch.Tensor   # (B, T) long
    lengths: torch.Tensor     # (B,) long, real tokens per row
    user_emb: torch.Tensor    # (B, du)
    item_emb: torch.Tensor    # (B, di)
    labels: torch.Tensor | None = None   # (B,) float in {0, 1}
    weights: torch.Tensor | None = None  # (B,) float: 0 for a padding sample (the epoch plan's), else 1
    slots: torch.Tensor | None = None    # (B, S) long: positions of the template's embedding slots (CoLLM)
    items: torch.Tensor | None = None    # (B,) long: the target item ids (Laser's item table)
    history_emb: torch.Tensor | None = None  # (B, H, d_cf): the history items' CF embeddings, left-padded (Laser)
    history_pad: torch.Tensor | None = None  # (B, H) bool: True where history_emb is padding
    users: torch.Tensor | None = None    # (B,) long: the user ids (BDLM's shared store)

    def to(self, device) -> "Batch":
        """The batch on ``device``. From the CPU to CUDA the host tensors are staged in pinned (page-locked)
        memory so that the copies are asynchronous (``non_blocking``): the forward is queued behind them
        on the same stream, and the host never waits."""
        device = torch.device(device)
        if device.type == "cpu":
            return Batch(*(None if t is None else t.cpu() for t in self.tensors()))
        pin = lambda t: t.pin_memory() if t.device.type == "cpu" else t  # noqa: E731
        return Batch(*(None if t is None else pin(t).to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple:
        return tuple(getattr(self, f) for f in FIELDS)

    @classmethod
    def from_arrays(cls, arrays: dict, device=None) -> "Batch":
        """A Batch from a dict of numpy arrays (an InteractionShard actor's batch; extra keys ignored), on
        ``device`` when given (the engine's: DeepSpeed does not move a model's inputs)."""
        batch = cls(*(None if arrays.get(f) is None else torch.from_numpy(np.asarray(arrays[f])) for f in FIELDS))
        return batch if device is None else batch.to(device)


def collate(prompts: Sequence[Sequence[int]], user_emb, item_emb, labels=None, pad_id: int = 0,
            weights=None, slots=None) -> Batch:
    """Right-pad token id lists into a Batch (``slots``: each prompt's slot positions, for CoLLM)."""
    ids, lengths = pad_prompts(prompts, pad_id)
    as_t = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return Batch(torch.from_numpy(ids), torch.from_numpy(lengths), as_t(user_emb), as_t(item_emb), as_t(labels),
                 as_t(weights), None if slots is None else torch.as_tensor(np.asarray(slots), dtype=torch.long))


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over the batch; with ``weights``, over the weighted samples only (the epoch
    plan's weight-0 padding samples count for nothing)."""
    per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.device), reduction="none")
    return weighted_mean(per, weights)


def answer_row(llm: nn.Module, token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight row (and bias) for one token, copied out of the (frozen) model.

    Under ZeRO-3 the caller gathers the head first (the trainer does) and passes the row in."""
    head = llm.get_output_embeddings()
    w = head.weight[token_id].detach().clone()
    b = None if getattr(head, "bias", None) is None else head.bias[token_id].detach().clone()
    return w, b


class CoRAModel(nn.Module):
    """Frozen LLM scored at the answer token, plus what its method (``cora.methods``) adds and trains:
    CoRA's generator and P, or TALLRec's LoRA A and P. ``method`` None: the injection's adapter says it
    ('cora' -> CoRA, 'lora' -> TALLRec)."""

    def __init__(self, llm: nn.Module, answer_token_id: int, user_dim: int, item_dim: int,
                 injection: InjectionConfig | None = None, generator: GeneratorConfig | None = None,
                 answer_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 method: "str | Method | None" = None):
        super().__init__()
        injection = injection or InjectionConfig()
        llm.requires_grad_(False)
        self.llm = llm
        w, b = answer_weight if answer_weight is not None else answer_row(llm, answer_token_id)
        self.register_buffer("answer_w", w, persistent=False)
        self.register_buffer("answer_b", b, persistent=False)
        if not isinstance(method, Method):
            method = get_method(method or ("tallrec" if injection.adapter == "lora" else "cora"))
        self.method = method
        self.method.attach(self, injection, generator, user_dim, item_dim)

    inputs_with_grad = False
    """Whether the backbone's input embeddings carry a gradient (set by ``trainer.engine.initialize`` when ZeRO-3
    hooks whole decoder layers: a leaf module's backward hook fires after its parameters' gradients only when
    an input of it requires a gradient). Costs the first layer's input gradient, nothing else."""

    def _with_grad(self, inputs: dict) -> dict:
        inputs = dict(inputs)
        if "input_ids" in inputs:
            inputs["inputs_embeds"] = self.llm.get_input_embeddings()(inputs.pop("input_ids"))
        if not inputs["inputs_embeds"].requires_grad:
            inputs["inputs_embeds"] = inputs["inputs_embeds"].detach().requires_grad_()
        return inputs

    @property
    def backbone(self) -> nn.Module:
        """The LLM without its LM head (LlamaModel, GPT2Model, ...)."""
        return self.llm.base_model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.method.trainable(self)

    def forward(self, batch: Batch, with_loss: bool = False, represent: bool = False):
        """The score of each prompt, (B,): the raw "Yes" logit at its answer position (``Method.score``);
        with ``with_loss`` (loss, scores), the loss the method trains with (``Method.loss``: BCE for all but
        RecCocktail's merge and Laser); with ``represent`` the hidden states read (B, d), for methods that
        encode (Laser's items)."""
        if batch.input_ids.shape[0] == 0:
            raise ValueError("empty batch: 0 samples")
        inputs = self.method.inputs(self, batch)
        if self.inputs_with_grad and torch.is_grad_enabled():
            inputs = self._with_grad(inputs)
        positions = inputs.pop("positions", None)                              # default: the last real token
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = batch.lengths.to(hidden.device) - 1 if positions is None else positions.to(hidden.device)
        h = hidden[rows, at]                                                  # (B, d) answer position
        if represent:
            return h
        logit = self.method.score(self, batch, h).float()                    # (B,)
        if not with_loss:
            return logit
        return self.method.loss(self, batch, h, logit), logit

    def yes_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's "Yes" logit of hidden states (B, d) -> (B,)."""
        logit = h @ self.answer_w.to(h.dtype)
        if self.answer_b is not None:
            logit = logit + self.answer_b.to(h.dtype)
        return logit

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the method's training loss over the batch's weighted samples, logits)."""
        return self(batch, with_loss=True)
