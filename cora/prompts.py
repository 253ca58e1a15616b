"""TALLRec-style prompts (text only, no ID tokens), with per-domain templates kept as data.

The templates live in ``prompt_templates.json`` beside this module (``movies``, ``books``,
``items``, and method families such as ``collm-movies``: a family prefix ends with "-", a domain name
has none); a user may pass their own JSON file of the same shape. A prompt lists the user's at most
``max_history`` most recent positive titles, each quoted, joined by ", ", then asks about the target
title and ends with ``#Answer:``, whose last token is the answer position. When the prompt is longer
than ``max_length`` tokens, the oldest history titles are dropped first; the question and the target
title are never cut.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

TEMPLATES_FILE = Path(__file__).with_name("prompt_templates.json")
REPRESENTATION_PREFIXES = ("laser-",)
"""Template families that describe a user (or an item, as a one-item history) without a question: no
{target}; a method reads a representation from them, not an answer."""


SLOTS = ("user_id", "target_id")
"""Embedding slots a template may hold (CoLLM's ID features): one token each, whose input embedding a
method replaces (the user's and the target item's mapped CF embeddings)."""
_MARK = re.compile("\x00(" + "|".join(SLOTS) + ")\x00")


@dataclass(frozen=True)
class PromptTemplate:
    template: str
    """Text with {history} and {target} placeholders (and optionally {user_id}, {target_id} slots); must end
    where the answer is to be read."""
    quote: str = '"{}"'
    """How one title is written (a format string with one {})."""
    separator: str = ", "
    """Between history titles."""

    @property
    def slots(self) -> tuple[str, ...]:
        """The embedding slots of the template, in the order they appear."""
        return tuple(sorted((s for s in SLOTS if "{" + s + "}" in self.template),
                            key=lambda s: self.template.index("{" + s + "}")))

    def render(self, history: Sequence[str], target: str) -> str:
        """The prompt text; a slot is rendered as a marker (NUL, its name, NUL) that the encoder replaces."""
        listed = self.separator.join(self.quote.format(t) for t in history)
        return self.template.format(history=listed, target=self.quote.format(target),
                                    **{s: f"\x00{s}\x00" for s in SLOTS})


def load_templates(path: str | Path = TEMPLATES_FILE) -> dict[str, PromptTemplate]:
    raw = json.loads(Path(path).read_text())
    out = {}
    for domain, spec in raw.items():
        tpl = PromptTemplate(**spec)
        # a representation template (Laser's: the user's history, no question) needs no {target}
        for field in ("{history}",) if domain.startswith(REPRESENTATION_PREFIXES) else ("{history}", "{target}"):
            if field not in tpl.template:
                raise ValueError(f"{path}: template {domain!r} lacks the placeholder {field}")
        out[domain] = tpl
    return out


def get_template(domain: str, path: str | Path = TEMPLATES_FILE) -> PromptTemplate:
    templates = load_templates(path)
    if domain not in templates:
        raise ValueError(f"unknown prompt domain {domain!r}; {path} defines {', '.join(sorted(templates))}")
    return templates[domain]


def text_domains(path: str | Path = TEMPLATES_FILE) -> list[str]:
    """The domains of the file: its template names without a family prefix (no "-"), sorted."""
    return sorted(d for d in load_templates(path) if "-" not in d)


def domain_encoders(tokenizer, family: str, domains: Sequence[str], max_history: int = 10,
                    max_length: int = 512) -> dict[str, "PromptEncoder"]:
    """One encoder per domain, with the template ``family + domain`` (``Method.template`` + domain): the
    prompts of a multi-domain directory, each sample with its own domain's. Their templates must have
    the same embedding slots, since a batch of them carries one slot layout."""
    encoders = {d: PromptEncoder(tokenizer, get_template(family + d), max_history, max_length) for d in domains}
    layouts = {d: e.template.slots for d, e in encoders.items()}
    if len(set(layouts.values())) > 1:
        raise ValueError(f"the templates {', '.join(family + d for d in layouts)} have different embedding slots "
                         f"({layouts}); give every domain's template of the family the same slots")
    return encoders


class PromptEncoder:
    """Renders and tokenises prompts to at most ``max_length`` tokens, answer position last."""

    def __init__(self, tokenizer, template: PromptTemplate, max_history: int = 10, max_length: int = 512):
        if max_history < 0 or max_length < 1:
            raise ValueError(f"max_history must be >= 0 and max_length >= 1, got {max_history}, {max_length}")
        self.tokenizer, self.template = tokenizer, template
        self.max_history, self.max_length = max_history, max_length
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self.prefix = [bos] if adds_bos else []

    def encode(self, history: Sequence[str], target: str) -> list[int]:
        """Token ids of the prompt; ``history`` is ordered oldest first."""
        return self.encode_with_slots(history, target)[0]

    def encode_with_slots(self, history: Sequence[str], target: str) -> tuple[list[int], list[int]]:
        """(token ids, the position of each of the template's slots, in ``template.slots`` order). The text
        between slots is tokenised piece by piece and each slot is one ``slot_token`` (its embedding is
        replaced by the method; the token itself is never read)."""
        recent = list(history)[-self.max_history:] if self.max_history else []
        for start in range(len(recent) + 1):  # drop the oldest titles first
            ids, where = self._tokens(self.template.render(recent[start:], target))
            if len(ids) <= self.max_length:
                return ids, [where[s] for s in self.template.slots]
        raise ValueError(f"the prompt without any history is {len(ids)} tokens, over max_length="
                         f"{self.max_length} (target title {target[:60]!r}); raise max_length")

    @property
    def slot_token(self) -> int:
        tok = self.tokenizer
        return next(t for t in (tok.unk_token_id, tok.eos_token_id, 0) if t is not None)

    def _tokens(self, text: str) -> tuple[list[int], dict[str, int]]:
        pieces = _MARK.split(text)            # text, slot name, text, slot name, ..., text
        ids, where = list(self.prefix), {}
        for k, piece in enumerate(pieces):
            if k % 2:
                where[piece] = len(ids)
                ids.append(self.slot_token)
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids, where


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists: ((B, T) int64 ids, (B,) int64 lengths), T = the longest prompt rounded up to
    a multiple of ``multiple`` (8 suits GPU matrix units)."""
    if len(prompts) == 0:
        raise ValueError("empty batch: no prompts given")
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    if int(lengths.min()) == 0:
        raise ValueError(f"prompt {int(lengths.argmin())} of the batch is empty (0 tokens)")
    ids = np.full((len(prompts), round_up(int(lengths.max()), multiple)), pad_id, dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    return ids, lengths
