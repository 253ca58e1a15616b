"""The planner's arithmetic (cora.plan) against values computed by hand for tiny-llama's shape, and its
parameter count against the built models."""

import pytest
import torch

from cora.llm import SHAPES, build_config
from cora.plan import Hardware, Setup, Shape, choose, flops, plan, relative_error

TINY = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=49152, tied=True)
ROUND = Hardware(name="round numbers", flops=1e9, bandwidth=1e8, latency=1e-4, optim_s_per_param=1e-8,
                 module_overhead_s=1e-3, runtime_bytes=0, comm_bytes=0, memory_bytes=1e12)


def test_the_shape_of_tiny_llama_and_its_counts(tokenizer):
    assert Shape.from_config(build_config("tiny-llama", tokenizer).to_dict()) == TINY
    # per layer: q 64x64 + k, v 64x32 + o 64x64 + gate, up, down 64x128 = 4096 + 2 x 2048 + 4096 + 3 x 8192
    assert TINY.layer_linears() == [4096, 2048, 2048, 4096, 8192, 8192, 8192]
    assert TINY.matmul_params == 2 * 36_864
    assert TINY.params == 49152 * 64 + 73_728 + 5 * 64 == 3_219_776        # tied head, 2 x 2 + 1 norms


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", *sorted(SHAPES)])
def test_the_parameter_count_is_the_built_models(name, tokenizer):
    from transformers import AutoModelForCausalLM
    cfg = build_config(name, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for k, p in model.named_parameters() if k.endswith("bias"))   # Qwen2's q/k/v
    assert Shape.from_config(cfg.to_dict()).params == n - biases


def setup(**kw) -> Setup:
    base = dict(shape=TINY, world=2, micro_batch=8, seq_len=100, generator_params=1000, generator_head_params=100,
                generator_modules=12)
    return Setup(**{**base, **kw})


def test_memory_by_hand():
    m = plan(setup(), ROUND).memory
    assert m["frozen"] == 3_219_776 * 4 / 2
    # gathered whole: the embedding table (V h) alone at the start, or every decoder module held from its forward
    # to its backward (2 layers x (36,864 + 2 norms x 64) + 64: all of them, far under DeepSpeed's reuse distance of 1e9)
    assert m["gathered"] == max(49152 * 64, 2 * 36_992 + 64) * 4 == 12_582_912
    # G = 1000 + P: 2 layers x r 16 x (q 64 + k 32 + v 32 + o 64) = 6144; 16 bytes each, halved
    assert m["trainable"] == (1000 + 6144) * 16 / 2
    # (3h + 5 d_q + 3I) = 192 + 320 + 384 = 896 per token and layer; 800 tokens, 4 bytes, 2 layers
    assert m["activations"] == 896 * 800 * 4 * 2 == 5_734_400
    assert m["peak"] == pytest.approx(6_439_552 + 12_582_912 + 57_152 + 5_734_400)
    assert plan(setup(world=1), ROUND).memory["gathered"] == 0        # one rank: its "partition" is the weight
    import dataclasses
    hw = dataclasses.replace(ROUND, runtime_bytes=5e8, comm_bytes=7e7)
    assert plan(setup(), hw).memory["peak"] == pytest.approx(m["peak"] + 5e8 + 7e7)
    assert plan(setup(world=1), hw).memory["comm"] == 0
    grown = plan(setup(), dataclasses.replace(ROUND, activation_factor=1.5, gathered_factor=3)).memory  # CPU malloc
    assert grown["activations"] == 1.5 * m["activations"] and grown["gathered"] == 3 * m["gathered"]
    assert grown["frozen"] == m["frozen"] and grown["trainable"] == m["trainable"]
    ac = plan(setup(activation_checkpointing=True), ROUND).memory
    assert ac["activations"] == 800 * 4 * (2 * 64 + 896)         # layer inputs + one layer's set
    rep = plan(setup(partitioning="replicated", dtype="bfloat16", zero_stage=3), ROUND).memory
    assert rep["frozen"] == 3_219_776 * 2 and rep["gathered"] == 0 and rep["trainable"] == 7144 * 18 / 2
    # ZeRO stage 2 (a replicated base's default): the bf16 weights whole, master, gradients and moments halved
    two = plan(setup(partitioning="replicated", dtype="bfloat16"), ROUND).memory
    assert two["trainable"] == 7144 * (2 + 16 / 2) and two["frozen"] == rep["frozen"]
    assert plan(setup(partitioning="replicated", world=1), ROUND).memory["trainable"] == 7144 * 16   # all of it
    kept = plan(setup(persistence_threshold=5000), ROUND).memory  # norms (64), q/o (4096), k/v (2048) stay whole
    whole = 5 * 64 + 2 * 2 * 4096 + 2 * 2 * 2048
    assert kept["frozen"] == ((3_219_776 - whole) / 2 + whole) * 4 == 6_489_344


def test_step_time_by_hand():
    # base 800 x 4 x 73,728; attention 12 x 8 x 100^2 x 64 x 2; injection 6 x 800 x 2 x 16 x 320;
    # generator 6 x 8 x (4 x 900 + 100)
    assert flops(setup()) == 235_929_600 + 122_880_000 + 49_152_000 + 177_600 == 408_139_200
    t = plan(setup(), ROUND).time
    assert t["compute"] == pytest.approx(0.4081392)
    # every module gathered once (held to its backward): half of the used frozen weights (embedding + layers +
    # final norm: all but the tied head, 3,219,776) and of the trainable ones over the wire, one collective per
    # module: 9 x 2 layers + embedding + final norm = 20, 4 x 2 P modules, 12 generator modules
    assert t["gather"] == pytest.approx(0.5 * (3_219_776 + 7144) * 4 / 1e8 + 40 * 1e-4) == 0.0685384
    assert t["reduce"] == pytest.approx(0.5 * 7144 * 4 / 1e8)
    # overhead: 2 passes x (20 LLM modules + 4 x 2 P modules + 12 generator modules) x 1 ms
    assert t["optimiser"] == pytest.approx(7144 / 2 * 1e-8) and t["overhead"] == pytest.approx(0.08)
    assert t["step"] == pytest.approx(0.4081392 + 0.0685384 + 0.00014288 + 3.572e-5 + 0.08)
    two = plan(setup(accumulation=2), ROUND).time       # two micro-batches, one AdamW step
    assert two["step"] == pytest.approx(2 * (t["step"] - t["optimiser"]) + t["optimiser"])
    one = plan(setup(world=1), ROUND).time
    assert one["gather"] == 0 and one["reduce"] == 0
    rep = plan(setup(partitioning="replicated", zero_stage=3), ROUND).time   # only the trainable part is gathered
    assert rep["gather"] == pytest.approx(0.5 * 7144 * 4 / 1e8 + 20 * 1e-4)
    # and only the modules holding ZeRO-3 parameters (P's 8, the generator's 12) run ZeRO-3's hooks
    assert rep["overhead"] == pytest.approx(2 * 20 * 1e-3)
    # ZeRO stage 2 (a replicated base's default): the same bytes in one all-gather after AdamW, no module hooked
    two = plan(setup(partitioning="replicated"), ROUND).time
    assert two["gather"] == pytest.approx(0.5 * 7144 * 4 / 1e8 + 1e-4) and two["overhead"] == 0
    assert two["reduce"] == rep["reduce"] and two["optimiser"] == rep["optimiser"]
    import dataclasses
    cpu = dataclasses.replace(ROUND, busy_slowdown=1.25, element_s=1e-9, step_overhead_s=0.01, copy_bandwidth=1e9)
    busy = plan(setup(), cpu).time                # two ranks sharing a node's cores: 1.25 x the compute time
    # element-wise work: 896 saved elements per token and layer x 800 tokens x 2 layers, 1 ns each
    assert busy["elementwise"] == pytest.approx(1.25 * 896 * 800 * 2 * 1e-9)
    assert busy["compute"] == pytest.approx(1.25 * t["compute"])
    assert busy["overhead"] == pytest.approx(t["overhead"] + 0.01)
    alone = plan(setup(world=1), cpu).time        # alone: the full rate; ZeRO-3's one-rank handling of the base
    assert alone["compute"] == pytest.approx(t["compute"]) and alone["elementwise"] == pytest.approx(896 * 1600e-9)
    assert alone["gather"] == pytest.approx(3_219_776 * 4 / 1e9)
    assert plan(setup(world=1, partitioning="replicated"), cpu).time["gather"] == 0
    ac = plan(setup(activation_checkpointing=True), ROUND).time
    assert ac["flops"] - t["flops"] == 800 * 2 * 73_728 and ac["overhead"] == pytest.approx(0.12)
    # a GPU's host: 5 ms per decoder layer and pass whatever the partitioning (2 layers, 2 passes; 3 recomputing)
    gpu = dataclasses.replace(ROUND, layer_overhead_s=5e-3)
    assert plan(setup(), gpu).time["overhead"] == pytest.approx(0.08 + 2 * 2 * 5e-3)
    assert plan(setup(partitioning="replicated", zero_stage=3), gpu).time["overhead"] == pytest.approx(0.04 + 2 * 2 * 5e-3)
    assert plan(setup(partitioning="replicated"), gpu).time["overhead"] == pytest.approx(2 * 2 * 5e-3)
    assert plan(setup(activation_checkpointing=True), gpu).time["overhead"] == pytest.approx(0.12 + 3 * 2 * 5e-3)


def test_deepspeeds_reuse_distance_decides_what_stays_gathered():
    # a reuse distance of 30,000 elements: module i is kept iff 2 x (elements after it) < 30,000. From the end:
    # final norm (after 0), down (after 64), up (after 8,256) are kept; gate (after 16,448: 32,896) and every
    # module before it is released after its forward and gathered again for its backward
    s = setup(reuse_distance=30_000)
    m, t = plan(s, ROUND).memory, plan(s, ROUND).time
    from cora.plan import gathers
    g = gathers(s)
    assert g["kept"] == 64 + 8192 + 8192
    assert g["elements"] == 49152 * 64 + 16_448 + 2 * (2 * 36_992 + 64 - 16_448)
    assert g["calls"] == 1 + 3 + 2 * 16
    assert m["gathered"] == 49152 * 64 * 4                 # the table still dominates the transient
    assert t["gather"] == pytest.approx(0.5 * (g["elements"] + 7144) * 4 / 1e8 + (36 + 20) * 1e-4)
    # parameters under the persistence threshold are whole on every rank: never gathered
    assert gathers(setup(persistence_threshold=5000))["calls"] == 1 + 2 * 3


def test_the_choice_of_partitioning_changes_with_size():
    big = Shape.from_config({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "vocab_size": 32000})
    gpu = Hardware(name="80 GB", flops=4e14, bandwidth=1.5e11, latency=3e-5, optim_s_per_param=5e-11,
                   module_overhead_s=2e-5, runtime_bytes=0, comm_bytes=0, memory_bytes=80e9)
    s = Setup(shape=big, world=8, micro_batch=8, seq_len=256, dtype="bfloat16", activation_checkpointing=True)
    best, why = choose(s, gpu)
    assert best.setup.partitioning == "replicated" and "zero3 would take" in why     # fits whole: no gathers
    small_gpu = Hardware(**{**gpu.__dict__, "memory_bytes": 10e9})
    best, why = choose(s, small_gpu)
    assert best.setup.partitioning == "zero3" and "replicated does not fit" in why
    best, why = choose(s, Hardware(**{**gpu.__dict__, "memory_bytes": 1e9}))
    assert why.startswith("nothing fits")
    # 70B over 2 nodes of 8: whole it does not fit; hpz gathers the base within a node and fits beside zero3
    huge = Shape.from_config({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256})
    nodes = Hardware(**{**gpu.__dict__, "inter_node_bandwidth": 5e10})
    best, why = choose(Setup(**{**s.__dict__, "shape": huge, "world": 16, "node_ranks": 8}), nodes)
    assert best.setup.partitioning == "hpz" and "zero3 would take" in why and "replicated does not fit" in why
    best, why = choose(Setup(**{**s.__dict__, "shape": huge, "world": 8}), nodes)      # one node: zero3
    assert best.setup.partitioning == "zero3"


def test_hpz_and_the_traffic_between_nodes_by_hand():
    import dataclasses
    hw = dataclasses.replace(ROUND, inter_node_bandwidth=1e7)           # 10x slower between nodes
    n, g = 3_219_776, 7144
    zero3, hpz = (plan(setup(world=4, node_ranks=2, partitioning=p), hw) for p in ("zero3", "hpz"))
    # hpz keeps a secondary partition of the base over the node's 2 ranks besides its quarter
    assert zero3.memory["frozen"] == n * 4 / 4 and hpz.memory["frozen"] == n * 4 / 4 + n * 4 / 2
    assert hpz.memory["gathered"] == zero3.memory["gathered"]
    # zero3 over 2 nodes: 3/4 of the frozen and trainable bytes between nodes; 40 calls (see the step by hand)
    assert zero3.time["gather"] == pytest.approx(0.75 * (n + g) * 4 / 1e7 + 40 * 1e-4)
    # hpz: the base from within the node (1/2 of it, at the node's bandwidth), the trainable part over all ranks
    assert hpz.time["gather"] == pytest.approx(0.5 * n * 4 / 1e8 + 0.75 * g * 4 / 1e7 + 40 * 1e-4)
    assert hpz.time["reduce"] == zero3.time["reduce"] == pytest.approx(0.75 * g * 4 / 1e7)
    # on one node the two gather the same bytes at the same bandwidth: zero3, which needs less memory, is chosen
    one = {p: plan(setup(world=4, partitioning=p), hw) for p in ("zero3", "hpz")}
    assert one["hpz"].time["step"] == pytest.approx(one["zero3"].time["step"])
    assert one["hpz"].memory["frozen"] == n * 4 / 4 * 2
    assert choose(setup(world=4), hw, partitionings=("zero3", "hpz"))[0].setup.partitioning == "zero3"
    assert choose(setup(world=4, node_ranks=2), hw, partitionings=("zero3", "hpz"))[0].setup.partitioning == "hpz"
    # no inter-node figure: the same bandwidth everywhere
    assert plan(setup(world=4, node_ranks=2), ROUND).time["gather"] == pytest.approx(0.75 * (n + g) * 4 / 1e8 + 4e-3)


def test_zero3s_hooks_have_their_own_activation_factor():
    import dataclasses
    hw = dataclasses.replace(ROUND, activation_factor=1.2, stage3_activation_factor=1.7)
    act = 896 * 800 * 4 * 2
    assert plan(setup(), hw).memory["activations"] == pytest.approx(1.7 * act)
    assert plan(setup(partitioning="replicated"), hw).memory["activations"] == pytest.approx(1.2 * act)
    assert plan(setup(partitioning="replicated", zero_stage=3), hw).memory["activations"] == pytest.approx(1.7 * act)
    assert plan(setup(), ROUND).memory["activations"] == act                 # None: activation_factor (1)


def test_bad_setups_are_refused_with_every_problem():
    with pytest.raises(ValueError) as e:
        plan(setup(world=0, dtype="int8", partitioning="fsdp", zero_stage=1), ROUND)
    assert "world must be >= 1, got 0" in str(e.value) and "dtype 'int8'" in str(e.value)
    assert "zero_stage 1 is not 2 or 3" in str(e.value)
    assert "partitioning 'fsdp' is not one of zero3, hpz, replicated" in str(e.value)
    with pytest.raises(ValueError, match=r"hpz needs the world \(6\) to be a multiple of the ranks per node \(4\)"):
        plan(setup(world=6, node_ranks=4, partitioning="hpz"), ROUND)
    with pytest.raises(ValueError, match="node_ranks must be >= 1 or None, got 0"):
        plan(setup(node_ranks=0), ROUND)
    with pytest.raises(ValueError, match="lacks intermediate_size"):
        Shape.from_config({"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "vocab_size": 10})
    assert relative_error(115, 100) == pytest.approx(0.15)
