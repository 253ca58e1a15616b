import json

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
