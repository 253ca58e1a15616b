"""A replicated frozen base (engine.partitioning=replicated): the LLM's frozen weights become buffers, which
DeepSpeed ZeRO-3 does not partition or gather; the model computes exactly as before."""

import pytest
import torch

from cora.llm import LLMConfig, load_llm
from trainer.engine import EngineConfig, build_llm, ds_config, frozen_as_buffers, frozen_weights, partition_stats


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
    assert len(held) == len(before) and partition_stats(held) == {"held": 3_219_776, "total": 3_219_776, "share": 1.0,
                                                                 "secondary": 0}
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    assert torch.equal(llm(ids).logits, ref(ids).logits)
    # a later parameter (the injection's P) is a parameter as usual
    llm.model.layers[0].self_attn.q_proj.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    assert [p.numel() for p in llm.parameters()] == [2] and len(frozen_weights(llm)) == len(before)


def test_the_partitioning_is_validated_and_auto_never_reaches_a_worker():
    assert EngineConfig(partitioning="fsdp").validate() == [
        "partitioning must be zero3, hpz, replicated or auto, got 'fsdp'"]
    assert EngineConfig(partitioning="auto").validate() == []
    with pytest.raises(ValueError, match="'auto' is resolved by cora train"):
        build_llm(LLMConfig(name="tiny-llama"), {}, "auto")
    with pytest.raises(ValueError, match="cora train resolves it before the workers start"):
        EngineConfig(partitioning="auto").stage


def test_the_zero_stage_follows_the_partitioning_and_a_conflict_is_refused():
    """ZeRO stage 2 over the trainable part with a replicated base (no module hooks), 3 with a partitioned one;
    stage 2 with a partitioned base cannot be: said with the fix."""
    assert EngineConfig(partitioning="replicated").stage == 2 and EngineConfig(partitioning="zero3").stage == 3
    assert EngineConfig(partitioning="replicated", zero_stage=3).stage == 3
    assert EngineConfig(partitioning="zero3", zero_stage=2).validate() == [
        "zero_stage 2 needs the frozen base whole on every rank, but partitioning is zero3: set "
        "engine.partitioning=replicated (or auto), or engine.zero_stage=3"]
    assert EngineConfig(zero_stage=1).validate() == ["zero_stage must be 2, 3 or auto, got 1"]
    auto_chose_zero3 = EngineConfig(partitioning="auto", zero_stage=2)   # valid: the stage applies when replicated
    assert auto_chose_zero3.validate() == []
    auto_chose_zero3.partitioning = "zero3"
    assert auto_chose_zero3.stage == 3
    # DeepSpeed's config: stage 2 carries no ZeRO-3 gather settings; 'auto' sizes its reduce bucket only
    two = ds_config(EngineConfig(partitioning="replicated", persistence_threshold="auto", prefetch_bucket_size="auto"),
                    2, hidden_size=64)["zero_optimization"]
    assert two == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 64 ** 2}
    three = ds_config(EngineConfig(prefetch_bucket_size="auto"), 2, hidden_size=64)["zero_optimization"]
    assert three["stage"] == 3 and three["stage3_prefetch_bucket_size"] == int(0.9 * 64 ** 2)
    assert "zero_hpz_partition_size" not in three


def test_hpz_is_stage_3_with_a_secondary_group_of_a_nodes_ranks():
    from cora.config import ConfigError, from_dict
    from trainer.config import TrainConfig
    assert EngineConfig(partitioning="hpz").stage == 3
    assert EngineConfig(partitioning="hpz", zero_stage=2).validate() == [
        "zero_stage 2 needs the frozen base whole on every rank, but partitioning is hpz: set "
        "engine.partitioning=replicated (or auto), or engine.zero_stage=3"]
    assert EngineConfig(node_ranks=0).validate() == ["node_ranks must be >= 1 or 'auto', got 0"]
    # auto: the ranks Ray Train put on this worker's node; a number: that, at most the world
    zero = ds_config(EngineConfig(partitioning="hpz"), 16, local_ranks=8)["zero_optimization"]
    assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 8
    assert ds_config(EngineConfig(partitioning="hpz", node_ranks=4), 16, local_ranks=8)["zero_optimization"][
        "zero_hpz_partition_size"] == 4
    assert ds_config(EngineConfig(partitioning="hpz", node_ranks=8), 2)["zero_optimization"]["zero_hpz_partition_size"] == 2
    with pytest.raises(ValueError, match="spans 3 ranks .* does not divide the 8 workers"):
        ds_config(EngineConfig(partitioning="hpz"), 8, local_ranks=3)         # uneven placement
    with pytest.raises(ConfigError, match="engine.node_ranks=3 does not divide run.workers=8"):
        from_dict(TrainConfig, {"engine": {"partitioning": "hpz", "node_ranks": 3}, "run": {"workers": 8}})
    assert from_dict(TrainConfig, {"engine": {"node_ranks": 8}, "run": {"workers": 2}}).validate() == []
