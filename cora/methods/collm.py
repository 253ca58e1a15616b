"""CoLLM (zyang1580/CoLLM): CF embeddings mapped into two token slots of its prompt, on top of a frozen TALLRec
LoRA; and the reading of such a LoRA from a TALLRec export (``read_lora``, also RecCocktail's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..injection import InjectionConfig
from .base import Method, method_of


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
