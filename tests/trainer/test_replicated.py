"""A replicated frozen base (engine.partitioning=replicated): the LLM's frozen weights become buffers, which
DeepSpeed ZeRO-3 does not partition or gather; the model computes exactly as before."""

import pytest
import torch

from cora.llm import LLMConfig, load_llm
from trainer.engine import EngineConfig, build_llm, frozen_as_buffers, frozen_weights, partition_stats


def test_frozen_weights_become_buffers_and_the_model_computes_the_same():
    ref, _ = load_llm(LLMConfig(name="tiny-llama"))
    llm, _ = load_llm(LLMConfig(name="tiny-llama"))
    before = {n: p.clone() for n, p in llm.named_parameters()}
    frozen_as_buffers(llm)
    assert list(llm.parameters()) == []                          # nothing left for ZeRO-3 to partition
    buffers = dict(llm.named_buffers())
    assert all(torch.equal(buffers[n], w) for n, w in before.items())
    # tied embeddings stay one tensor; frozen_weights lists each once, with every element
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    held = frozen_weights(llm)
    assert len(held) == len(before) and partition_stats(held) == {"held": 3_219_776, "total": 3_219_776, "share": 1.0}
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    assert torch.equal(llm(ids).logits, ref(ids).logits)
    # a later parameter (the injection's P) is a parameter as usual
    llm.model.layers[0].self_attn.q_proj.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    assert [p.numel() for p in llm.parameters()] == [2] and len(frozen_weights(llm)) == len(before)


def test_the_partitioning_is_validated_and_auto_never_reaches_a_worker():
    assert EngineConfig(partitioning="fsdp").validate() == ["partitioning must be zero3, replicated or auto, got 'fsdp'"]
    assert EngineConfig(partitioning="auto").validate() == []
    with pytest.raises(ValueError, match="'auto' is resolved by cora train"):
        build_llm(LLMConfig(name="tiny-llama"), {}, "auto")
