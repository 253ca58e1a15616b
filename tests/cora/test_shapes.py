"""Shape presets in one process: the real families' shapes and parameter counts, weights that are a function
of position (so ranks can build their slices), and the tiny presets' weights unchanged."""

import hashlib
from pathlib import Path

import pytest
import torch

from cora.llm import SHAPE_CHUNK, SHAPES, LLMConfig, build_config, load_llm, shape_parameters, shape_values

ROOT = Path(__file__).resolve().parents[2]

# Parameter counts of the released models (their model cards / safetensors index), with Llama-2's vocabulary
# raised from 32,000 to the SmolLM2 tokenizer's 49,152 (+ 2 x 17,152 x hidden: input and output embeddings).
PUBLISHED = {"smollm2-135m-shape": 134_515_008, "smollm2-360m-shape": 361_821_120,
             "smollm2-1.7b-shape": 1_711_376_384, "llama-3.2-1b-shape": 1_235_814_400,
             "llama-3.2-3b-shape": 3_212_749_824, "llama-2-7b-shape": 6_738_415_616 + 2 * 17_152 * 4096,
             "llama-2-13b-shape": 13_015_864_320 + 2 * 17_152 * 5120, "llama-3-70b-shape": 70_553_706_496}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_have_the_published_parameter_counts(name, tokenizer):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):                           # shapes only: no memory, even for 70B
        model = AutoModelForCausalLM.from_config(build_config(name, tokenizer))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    assert (ROOT / "configs" / "llm" / f"{name}.yaml").is_file()


def test_shape_values_are_a_function_of_position_not_of_who_asks():
    total = 2 * SHAPE_CHUNK + 12_345                     # three blocks, the last one short
    whole = torch.empty(total)
    shape_values(whole, "layers.0.w", "normal", 0.02, 0, 0, total)
    assert abs(whole.std().item() - 0.02) < 1e-3 and abs(whole.mean().item()) < 1e-4
    for start, n in [(0, 10), (SHAPE_CHUNK - 5, 10), (total // 2, total - total // 2), (total - 3, 3)]:
        part = torch.empty(n, dtype=torch.bfloat16)       # any dtype: the cast of the same values
        shape_values(part, "layers.0.w", "normal", 0.02, 0, start, total)
        assert torch.equal(part, whole[start:start + n].bfloat16())
    other = torch.empty(total)
    shape_values(other, "layers.1.w", "normal", 0.02, 0, 0, total)   # another parameter, other values
    assert not torch.equal(other, whole)
    with pytest.raises(ValueError, match="unknown initialisation kind 'uniform' for x"):
        shape_values(other, "x", "uniform", 0.02, 0, 0, total)


def test_a_shape_built_in_one_process_is_initialised_like_transformers_does(tokenizer):
    model, _ = load_llm(LLMConfig(name="smollm2-135m-shape"))
    kinds = {kind for _, _, kind in shape_parameters(model)}
    assert kinds == {"normal", "ones"}                   # Llama: no biases
    assert model.lm_head.weight is model.model.embed_tokens.weight            # tied, as SmolLM2 is
    assert torch.equal(model.model.norm.weight, torch.ones(576))
    q = model.model.layers[3].self_attn.q_proj.weight
    assert abs(q.std().item() - model.config.initializer_range) < 1e-3
    again, _ = load_llm(LLMConfig(name="smollm2-135m-shape"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    seeded, _ = load_llm(LLMConfig(name="smollm2-135m-shape", seed=1))
    assert not torch.equal(seeded.model.layers[3].self_attn.q_proj.weight, q)


def test_the_tiny_presets_keep_their_weights():
    """The tiny presets are transformers' own initialisation under torch.manual_seed(0), as before the
    shape presets existed (the 2-rank tests compare against one-process runs of them)."""
    want = {"tiny-llama": "5cf546b41184f660", "tiny-qwen2": "409f322335849aaa", "tiny-gpt2": "02c95bb0d5e806e7"}
    for name, digest in want.items():
        model, _ = load_llm(LLMConfig(name=name))
        h = hashlib.sha256()
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        assert h.hexdigest()[:16] == digest, name


