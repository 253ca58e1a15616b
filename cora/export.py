"""A trained CoRA adapter in one process, without DeepSpeed: the frozen LLM (loaded as configured)
plus the exported tensors of its method (CoRA: the generator and P).

    EXPORT_DIR/config.json          {"method": "cora", "llm": {...}, "injection": {...}, "generator": {...}, "cf_dim": d}
                                    (+ the method's section, e.g. "collm": {"mid_times": 10, "lora_from": null})
    EXPORT_DIR/adapter.safetensors  the method's exported tensors (``Method.exported``: the trainable ones, and
                                    CoLLM's frozen stage-1 LoRA), named as in CoRAModel.named_parameters
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from .generator import GeneratorConfig
from .injection import InjectionConfig
from .llm import LLMConfig, load_llm, resolve_answer_token
from .methods import make_method
from .scoring import CoRAModel


def build_model(cfg: dict) -> tuple[CoRAModel, object]:
    """(CoRAModel with an untrained generator and P, tokenizer) as a saved config describes it ({"llm",
    "injection", "generator", "cf_dim"}: an export's config.json, or a checkpoint's saved config). The
    frozen LLM is loaded as configured (presets are built from their seed: the weights a run trained with)."""
    llm, tok = load_llm(LLMConfig(**cfg["llm"]))
    return CoRAModel(llm, resolve_answer_token(tok), cfg["cf_dim"], cfg["cf_dim"],
                     InjectionConfig(**cfg.get("injection", {})), GeneratorConfig(**cfg.get("generator", {})),
                     method=make_method(cfg)), tok


def load_exported(export_dir: str | Path) -> tuple[CoRAModel, object]:
    """(CoRAModel in eval mode, tokenizer) with the exported generator and P."""
    export_dir = Path(export_dir)
    model, tok = build_model(json.loads((export_dir / "config.json").read_text()))
    state = load_file(str(export_dir / "adapter.safetensors"))
    want = set(model.method.exported(model))
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise ValueError(f"{export_dir}/adapter.safetensors does not fit the configured model: missing "
                         f"{missing}, unexpected {extra}; was it exported with this config.json?")
    model.load_state_dict(state, strict=False)
    return model.eval(), tok
