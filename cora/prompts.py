"""TALLRec-style prompts (text only, no ID tokens), with per-domain templates kept as data.

The templates live in ``prompt_templates.json`` beside this module (``movies``, ``books``,
``items``); a user may pass their own JSON file of the same shape. A prompt lists the user's at most
``max_history`` most recent positive titles, each quoted, joined by ", ", then asks about the target
title and ends with ``#Answer:``, whose last token is the answer position. When the prompt is longer
than ``max_length`` tokens, the oldest history titles are dropped first; the question and the target
title are never cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

TEMPLATES_FILE = Path(__file__).with_name("prompt_templates.json")


@dataclass(frozen=True)
class PromptTemplate:
    template: str
    """Text with {history} and {target} placeholders; must end where the answer is to be read."""
    quote: str = '"{}"'
    """How one title is written (a format string with one {})."""
    separator: str = ", "
    """Between history titles."""

    def render(self, history: Sequence[str], target: str) -> str:
        listed = self.separator.join(self.quote.format(t) for t in history)
        return self.template.format(history=listed, target=self.quote.format(target))


def load_templates(path: str | Path = TEMPLATES_FILE) -> dict[str, PromptTemplate]:
    raw = json.loads(Path(path).read_text())
    out = {}
    for domain, spec in raw.items():
        tpl = PromptTemplate(**spec)
        for field in ("{history}", "{target}"):
            if field not in tpl.template:
                raise ValueError(f"{path}: template {domain!r} lacks the placeholder {field}")
        out[domain] = tpl
    return out


def get_template(domain: str, path: str | Path = TEMPLATES_FILE) -> PromptTemplate:
    templates = load_templates(path)
    if domain not in templates:
        raise ValueError(f"unknown prompt domain {domain!r}; {path} defines {', '.join(sorted(templates))}")
    return templates[domain]


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
        recent = list(history)[-self.max_history:] if self.max_history else []
        for start in range(len(recent) + 1):  # drop the oldest titles first
            ids = self.prefix + self.tokenizer(self.template.render(recent[start:], target),
                                               add_special_tokens=False).input_ids
            if len(ids) <= self.max_length:
                return ids
        raise ValueError(f"the prompt without any history is {len(ids)} tokens, over max_length="
                         f"{self.max_length} (target title {target[:60]!r}); raise max_length")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists: ((B, T) int64 ids, (B,) int64 lengths), T = the longest prompt."""
    if len(prompts) == 0:
        raise ValueError("empty batch: no prompts given")
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    if int(lengths.min()) == 0:
        raise ValueError(f"prompt {int(lengths.argmin())} of the batch is empty (0 tokens)")
    ids = np.full((len(prompts), int(lengths.max())), pad_id, dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    return ids, lengths
