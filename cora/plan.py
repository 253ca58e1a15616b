"""The planner: per-rank memory and step time of a CoRA training step, from the model's shape.

Pure arithmetic (no DeepSpeed, no torch import): it runs in a notebook. ``cora plan`` (trainer/planner.py)
is its command line. Every figure is per rank and per micro-batch step (one forward + backward, then the
optimiser step).

Notation
    N      frozen LLM parameters (``Shape.params``)
    N_mm   its matmul parameters per token: the decoder layers' linear weights, L x (h d_q + 2 h d_kv +
           d_q h + 3 h I). The embedding is a lookup and only the answer token's row of the LM head is
           computed, so neither counts.
    L, h, I, V         layers, hidden size, MLP size, vocabulary
    d_q, d_kv          heads x head_dim, kv_heads x head_dim
    W      ranks; B micro-batch per rank; T tokens per sample (prompt length)
    n      ranks per node (``Setup.node_ranks``; W when all ranks share one node)
    b      bytes per frozen weight and per activation element: 4 (float32) or 2 (bfloat16)
    G      trainable parameters: the generator (G_gen) and P (G_P = L x r x (d_q + 2 d_kv + h) for q/k/v/o)
    r      the injection rank; n_q = 4 generator queries

Memory per rank (bytes), ``plan(...).memory``
    runtime      R: the process before any model is built (Python, torch, DeepSpeed, a Ray worker); a
                 property of the machine (``Hardware.runtime_bytes``), 0 for GPU memory
    comm         C when W > 1 (``Hardware.comm_bytes``): the communication buffers a rank touches (on the
                 CPU: DeepSpeed's shared-memory collectives map every rank's 66 MiB workspace, and gloo)
    frozen       zero3: N x b / W (every parameter partitioned: persistence threshold 0; with a threshold
                 p, the parameters with fewer than p elements are whole on every rank);
                 hpz: that + N x b / n, n the ranks of a node (``Setup.node_ranks``): DeepSpeed's hpZ (ZeRO++)
                 keeps a secondary partition of every partitioned weight over the node's ranks;
                 replicated: N x b (the trainer holds it as buffers, which DeepSpeed leaves whole)
    gathered     zero3 and hpz with W > 1 only (one rank's "partition" is the weight itself: nothing is copied):
                 max(V x h, K) x b, the full tensors of gathered modules alive at once. DeepSpeed releases a
                 module after its forward unless it is used again within stage3_max_reuse_distance elements
                 (``Setup.reuse_distance``, default 1e9) of its trace; a decoder module is used again at its
                 backward, after twice the elements behind it, so K = the modules with 2 x (elements after
                 them) < 1e9: every decoder module of a model under ~0.5B matrix parameters, the last ~0.5B
                 elements of a larger one (``gathers``). The embedding (V x h) is gathered alone at the start
                 and has no backward; the LM head is never gathered (only the answer row is scored, gathered
                 once at set-up)
    trainable    G x s / W: fp32 training s = 16 (weights 4, gradients 4, AdamW's two moments 8); bf16
                 s = 18 (bf16 weights 2, fp32 master 4, fp32 gradients 4, moments 8). ZeRO-3 partitions
                 all of it; ZeRO stage 2 (a replicated base's default, ``Setup.zero_stage``) keeps the weights
                 whole: G x (b + (s - b) / W).
    activations  saved for backward, per token and layer, in elements:
                     2h (the two RMSNorms' inputs) + h (the shared q/k/v down-projection's input,
                     dropout(x), kept for A's gradient) + 4 d_q (attention's q, k, v, output; k and v
                     expanded to d_q) + d_q (o_proj's injection input) + 3I (gate, SiLU(gate), up)
                 = 3h + 5 d_q + 3I, times B x T x L x b. With activation checkpointing: the layer
                 inputs, B x T x L x h x b, plus one layer's full set (recomputed in backward).
    peak = runtime + comm + frozen + a x gathered + trainable + a x activations, a the allocator's peak over
           the live size of what a step allocates (``Hardware.activation_factor``, ``gathered_factor``: fitted,
           on the CPU the peak resident set keeps freed blocks; under ZeRO-3, whose module hooks wrap every
           module's inputs and outputs, the activations' a is ``stage3_activation_factor``). T is the longest padded prompt of a step
           for the memory (data.max_length before a run), the mean one for the time.

Step time per rank (seconds), ``plan(...).time``
    flops        B T (4 N_mm) [+ B T 2 N_mm with activation checkpointing: the recomputed forward]
                 (the base is frozen: forward 2 N_mm per token, backward to the activations 2 N_mm, no
                 weight gradients)
                 + 3 x 4 B T^2 d_q L (attention scores and values: forward 4 T^2 d_q per sample and
                 layer, backward twice that)
                 + 6 B T L r (2h + d_q + 2 d_kv + h) (the injection: two down-projections x A_b, one per
                 shared group, and P; forward 2, backward 4 per multiply-add)
                 + 6 B (n_q (G_gen - G_head) + G_head) (the generator: each of its n_q query tokens through
                 every Q-Former weight, an over-count for the cross-attention's key/value projections,
                 which read one token; the output projection G_head once, on the queries' mean)
    compute      k_busy x flops / F (F: achieved FLOP/s of one rank on the products, ``Hardware.flops``;
                 k_busy = ``Hardware.busy_slowdown`` when W > 1 ranks share a node's cores, else 1)
    elementwise  k_busy x B T L (3h + 5 d_q + 3I) x t_e: the element-wise work (norms, SiLU, rotary, softmax,
                 dropout and their backward), per saved activation element (``Hardware.element_s``)
    modules      M = M_llm + 4 L + M_gen: the modules holding ZeRO-3 parameters, each with ZeRO-3's hooks:
                 M_llm = 9 L + 2 (+1 for an untied head: 7 linears and 2 norms per layer, the embedding,
                 the final norm; 0 for a replicated base, whose weights are buffers), 4 L the injection's P
                 (q/k/v/o), M_gen the generator's (counted from the built generator); the last two are 0
                 under ZeRO stage 2, which hooks no module
    gather       W = 1, zero3: E b / ``Hardware.copy_bandwidth`` (no collective; ZeRO-3 still handles the
                 frozen weights every step).
                 W > 1: (W - 1)/W x (E b + 4 G) / BW + (calls + 4 L + M_gen) x lat, E the frozen elements
                 gathered per step: each used module once at its forward (the embedding, the decoder
                 modules, the final norm) and again at its backward when it was released (``gathers``: none
                 under ~0.5B); the trainable part is held from forward to backward, gathered once. A
                 replicated base gathers only the trainable part (E = 0, calls = 0); under stage 2 that is
                 one all-gather of the updated weights after the optimiser step, 1 call instead of 4 L + M_gen.
                 BW is ``Hardware.inter_node_bandwidth`` when the W ranks span nodes (W > n), else
                 ``bandwidth``. hpz gathers the frozen base within a node, (n - 1)/n x E b / ``bandwidth``:
                 a frozen weight's secondary partition, made at its first gather, is never invalidated (only
                 the trainable ones are, after each optimiser step), so from the second step on every gather
                 of the base reads it (the first step's gathers span all ranks; not planned)
    reduce       (W - 1)/W x 4 G / BW (the trainable gradients' reduce-scatter, over all ranks)
    optimiser    G / W x t_p (AdamW per parameter, memory-bound; ``Hardware.optim_s_per_param``)
    overhead     passes x (M x t_mod + L x t_L) + t_0 [+ t_sync when W > 1]: host time per module holding
                 ZeRO-3 parameters and per pass (ZeRO-3's pre/post module hooks), per decoder layer and pass
                 whatever the partitioning
                 (its operators' launches and the hooks on its modules: ``Hardware.layer_overhead_s``, the
                 term that sets a GPU's step at small batches), and per micro-batch whatever the model
                 (``Hardware.step_overhead_s``), and, with several ranks, per micro-batch for the step's fixed
                 collectives (``Hardware.sync_overhead_s``)
    step = k x (compute + elementwise + gather + reduce + overhead) + optimiser, k micro-batches per
           optimiser step (``Setup.accumulation``)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
N_QUERIES = 4
"""The generator's learnable queries (the paper's 4)."""


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's shape (Llama, Mistral, Qwen2: q/k/v/o attention, gated MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        """From a transformers config (config.json as a dict)."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"the planner needs a Llama-style config (Llama, Mistral, Qwen2); this one "
                             f"(model_type {cfg.get('model_type')!r}) lacks {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                   heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linears(self) -> list[int]:
        """Elements of each linear weight of one decoder layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [h * self.d_q, h * self.d_kv, h * self.d_kv, self.d_q * h, h * i, h * i, i * h]

    @property
    def matmul_params(self) -> int:
        """N_mm: the linear weights a token goes through (decoder layers only)."""
        return self.layers * sum(self.layer_linears())

    @property
    def modules(self) -> int:
        """M_llm: modules holding weights: 7 linears + 2 norms per layer, the embedding, the final norm, an
        untied head."""
        return 9 * self.layers + 2 + (0 if self.tied else 1)

    @property
    def params(self) -> int:
        """N: every parameter (embedding, layers with their two norms, final norm, untied head)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.matmul_params + (2 * self.layers + 1) * self.hidden

    def step_modules(self) -> list[int]:
        """Elements of each frozen weight a CoRA step uses, in forward order: the embedding (V h), then per
        layer the input norm, q, k, v, o, the second norm, gate, up, down, then the final norm. The LM head is
        not among them: only the answer token's row is scored, gathered once at set-up."""
        h = self.hidden
        q, k, v, o, gate, up, down = self.layer_linears()
        return [self.vocab * h] + [h, q, k, v, o, h, gate, up, down] * self.layers + [h]

    def small_params(self, threshold: int) -> int:
        """Elements of the parameters with fewer than ``threshold`` elements (ZeRO-3 keeps them whole)."""
        sizes = [self.hidden] * (2 * self.layers + 1) + self.layer_linears() * self.layers
        sizes += [self.vocab * self.hidden] * (1 if self.tied else 2)
        return sum(s for s in sizes if s < threshold)


@dataclass(frozen=True)
class Hardware:
    """What one rank's device achieves (measured, not datasheet figures, except where stated)."""

    name: str
    flops: float
    """F: achieved FLOP/s of one rank on the step's matrix products."""
    bandwidth: float
    """BW: bytes/s one rank receives in an all-gather."""
    latency: float
    """lat: seconds per collective call (one per gathered module)."""
    optim_s_per_param: float
    """t_p: AdamW seconds per trainable parameter on this rank."""
    module_overhead_s: float
    """t_mod: host seconds per module holding parameters, per pass (Python, ZeRO-3's module hooks)."""
    runtime_bytes: float
    """R: the process's memory before any model is built (0 for a GPU's device memory)."""
    comm_bytes: float
    """C: memory a rank's communication adds when W > 1."""
    memory_bytes: float
    """Memory for the ranks of one device (for 'fits'): a GPU's, or a CPU node's that its ranks share."""
    element_s: float = 0.0
    """t_e: seconds of element-wise work (norms, activations, rotary, softmax, dropout, their backward) per
    activation element a step saves (the activations term's element count); 0 where it hides under the
    products (a GPU, assumed)."""
    step_overhead_s: float = 0.0
    """t_0: host seconds per micro-batch step whatever the model (the loop, the batch, the generator's Python)."""
    peak_flops: float | None = None
    """The datasheet peak FLOP/s of one rank's device (MFU's denominator in ``cora scale``); None: none (a CPU)."""
    sync_overhead_s: float = 0.0
    """t_sync: host seconds per micro-batch step when W > 1, whatever the model: the step's fixed collectives
    (the gradients' reduce-scatter calls, the gradient norm's and the loss's all-reduce), each waiting for the
    slowest rank; on a CPU node the ranks also share its cores with the data actors."""
    layer_overhead_s: float = 0.0
    """t_L: host seconds per decoder layer per pass whatever the partitioning (its operators' kernel launches,
    ZeRO-3's hooks on its modules); 0 where a fit folds it into the other terms (this CPU, whose step is its
    products)."""
    copy_bandwidth: float | None = None
    """bytes/s of ZeRO-3's per-step handling of the frozen weights on one rank (W = 1: no collective, but the
    same bytes are touched); None: free."""
    busy_slowdown: float = 1.0
    """k_busy: compute and element-wise time x this when W > 1 ranks share a node's cores, caches and memory
    bandwidth (this CPU); 1 for a device per rank."""
    activation_factor: float = 1.0
    """a_act: peak memory of a step's activations over their live size. On the CPU the peak resident set is
    glibc malloc's high-water mark, which keeps freed blocks of the varying batch shapes; a GPU's
    max_memory_allocated counts live tensors only, yet peaked at 1.55x the counted activations on one H200
    (the step's transient tensors, which the count of saved ones leaves out)."""
    shared_by: int = 1
    """Ranks that share memory_bytes at most (a CPU node: one rank per core); 1: a device per rank."""
    gathered_factor: float = 1.0
    """a_gat: the same for the weights ZeRO-3 gathers (their all-gather buffers and copies, then the heap's)."""
    stage3_activation_factor: float | None = None
    """a_act under ZeRO-3 (the trainable part at stage 3: a partitioned base, or ``zero_stage`` 3): its module
    hooks wrap every module's inputs and outputs, and the peak resident set of a CPU step grows with them;
    None: ``activation_factor``."""
    inter_node_bandwidth: float | None = None
    """BW between nodes: bytes/s one rank receives in a collective whose ranks span several nodes (the
    slowest link sets it); None: ``bandwidth`` (one node, or not known)."""


# This project's 2-core CPU machine (05 Dec 2026, 23:40-00:03 UTC). F by ``python benchmarks/calibrate.py --json``
# (104.9 GFLOP/s); t_p the fused AdamW's (0.5-0.8 ns; AdamW is a small term: the fit subtracts it from each measured
# step). Every other constant fitted by ``python benchmarks/calibrate.py --fit REPORT --size smollm2-360m-shape
# --small tiny-llama --flops 104.9e9 --latency 0.2756e-3`` on the report of ``cora scale --config configs/demo.yaml
# --sizes tiny-llama,smollm2-135m-shape,smollm2-360m-shape --workers 1,2 --partitioning zero3,replicated --steps 14
# --warmup 4 data.max_length=192`` (the replicated points under ZeRO stage 2, their default): from the four points
# of the 360M shape and of tiny-llama. The 135M shape's four points validate them, and the hpz points of ``cora
# scale ... --workers 2 --partitioning hpz`` (the README's tables). t_mod, 0.13 ms per ZeRO-3-hooked module and
# pass, is what separates a zero3 step from a replicated one beside the handling of the frozen bytes; the latency
# (41 us per collective under the two ranks' contention; calibrate measures 0.28 ms idle, which the fit starts
# from) and the bandwidth are what a 2-rank zero3 step's gathers cost; t_0 is what is left per step.
# The element-wise rate, the allocator's high-water factors and the two ranks' contention for the 2 cores are
# properties of this machine, whose speed drifts by tens of percent between sessions (t_e was 2.6, 6.1 and now
# 5.3 ns): fit them again on another.
CPU = Hardware(name="cpu (this project's 2-core machine, 1 thread per rank, gloo)", flops=104.9e9,
               bandwidth=240.1e6, latency=41.31e-6, optim_s_per_param=0.7e-9, module_overhead_s=0.1348e-3,
               runtime_bytes=670.3e6, comm_bytes=28.48e6, memory_bytes=22 * 2**30, shared_by=2, element_s=5.31e-9,
               step_overhead_s=0.0138, sync_overhead_s=0.01831, copy_bandwidth=2.559e9, busy_slowdown=1.164,
               activation_factor=1.457, stage3_activation_factor=1.956, gathered_factor=2.182)
# One H100/H200 SXM per rank. The products at 40% of the dense bf16 peak (989 TFLOP/s): the frozen 7B shape's
# one-process step reached 43% on an H200 (README "On a GPU"). The host terms (t_L, t_mod, t_0) and the
# activations' factor fitted, by relative least squares, on the six points of `bash benchmarks/gpu_scale.sh`
# on one H200 (2026-12-04: the 135M, 1B and 7B shapes x zero3 and replicated, one GPU, batch 8, ~99 tokens,
# the paper's generator): within 12% of each point's step and 7% of its peak device memory, with no point left
# over to validate them. At that batch the step is the host's (0.5-1.1 s against 0.001-0.06 s of products): t_L
# 7.8 ms per decoder layer and pass, t_mod 0.45 ms per module with ZeRO-3 weights and pass, t_0 0.13 s. The
# all-gather bandwidth and latency (NVLink, W > 1) are assumed, not measured, and so is the bandwidth between
# nodes (one 400 Gb/s InfiniBand NIC per GPU: 50 GB/s); the memory is an H100's 80 GB (an H200 has 141). Fit
# again on the cluster's own machines: the host's speed is the step here.
H100 = Hardware(name="H100/H200 SXM (products 40% of 989 TFLOP/s bf16; host and activation terms fitted on one H200; "
                     "150 GB/s all-gather in a node, 50 GB/s between nodes, assumed)",
                flops=0.4 * 989e12, peak_flops=989e12, bandwidth=150e9, latency=30e-6, optim_s_per_param=0.05e-9,
                module_overhead_s=0.4476e-3, layer_overhead_s=7.786e-3, step_overhead_s=0.131, runtime_bytes=0,
                comm_bytes=0, memory_bytes=80e9, activation_factor=1.55, inter_node_bandwidth=50e9)
HARDWARE = {"cpu": CPU, "h100": H100}


@dataclass(frozen=True)
class Setup:
    """One training configuration to plan."""

    shape: Shape
    world: int = 1
    micro_batch: int = 8
    seq_len: int = 128
    dtype: str = "float32"
    activation_checkpointing: bool = False
    partitioning: str = "zero3"
    """'zero3' (the frozen base partitioned over all ranks), 'hpz' (the same, plus a secondary partition of
    it over the ranks of one node, DeepSpeed's hpZ / ZeRO++: ``node_ranks``) or 'replicated' (a whole copy on
    every rank, only the generator and P data-parallel)."""
    node_ranks: int | None = None
    """Ranks per node (n); None: every rank on one node. A collective over ranks of several nodes runs at
    ``Hardware.inter_node_bandwidth``; hpz's secondary partition spans one node's n ranks."""
    generator_params: int = 0
    """G_gen: the generator's parameters (cora.generator; ``trainer.planner`` counts them)."""
    generator_head_params: int = 0
    """G_head: of those, the output projection Linear(hidden -> d_model x r)."""
    generator_modules: int = 0
    """M_gen: the generator's modules that hold parameters (each gets ZeRO-3's hooks)."""
    rank: int = 16
    persistence_threshold: int = 0
    accumulation: int = 1
    """Micro-batches per optimiser step (forward, backward and gradient reduce-scatter each; AdamW once)."""
    zero_stage: int = 2
    """The ZeRO stage over the trainable part with a replicated base (``engine.zero_stage``: 2, or 3); a
    partitioned base is always 3 (``stage``)."""
    reuse_distance: int = 10**9
    """DeepSpeed's stage3_max_reuse_distance (elements; its default 1e9): a module gathered in forward stays
    gathered until its backward when fewer elements than this are used in between."""

    def validate(self) -> list[str]:
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("world", "micro_batch", "seq_len", "rank",
                                                                          "accumulation")
                    if getattr(self, k) < 1]
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.partitioning not in PARTITIONINGS:
            problems.append(f"partitioning {self.partitioning!r} is not one of {', '.join(PARTITIONINGS)}")
        if self.node_ranks is not None and self.node_ranks < 1:
            problems.append(f"node_ranks must be >= 1 or None, got {self.node_ranks}")
        elif self.partitioning == "hpz" and self.world % self.ranks_per_node != 0:
            problems.append(f"hpz needs the world ({self.world}) to be a multiple of the ranks per node "
                            f"({self.ranks_per_node}): DeepSpeed's secondary groups are whole nodes")
        if self.zero_stage not in (2, 3):
            problems.append(f"zero_stage {self.zero_stage!r} is not 2 or 3")
        return problems

    @property
    def stage(self) -> int:
        """The ZeRO stage the trainable part runs under: 3 with a partitioned base, else ``zero_stage``."""
        return 3 if self.partitioned else self.zero_stage

    @property
    def partitioned(self) -> bool:
        """Whether ZeRO-3 partitions the frozen base (zero3, hpz)."""
        return self.partitioning != "replicated"

    @property
    def ranks_per_node(self) -> int:
        """n: the ranks of one node (``node_ranks``, None resolved: all of them)."""
        return min(self.node_ranks or self.world, self.world)

    @property
    def multi_node(self) -> bool:
        return self.world > self.ranks_per_node


@dataclass
class Plan:
    setup: Setup
    hardware: Hardware
    memory: dict = field(default_factory=dict)
    """bytes per rank: runtime, frozen, gathered, trainable, activations, peak."""
    time: dict = field(default_factory=dict)
    """seconds per step: compute, gather, reduce, optimiser, overhead, step; and flops."""

    @property
    def budget(self) -> float:
        """Bytes one rank may use: the device's memory, shared by up to ``Hardware.shared_by`` ranks."""
        return self.hardware.memory_bytes / min(self.setup.world, self.hardware.shared_by)

    @property
    def fits(self) -> bool:
        return self.memory["peak"] <= self.budget

    def as_dict(self) -> dict:
        s = asdict(self.setup)
        s["shape"] = asdict(self.setup.shape)
        return {"setup": s, "hardware": self.hardware.name, "params": self.setup.shape.params,
                "trainable_params": trainable_params(self.setup), "fits": self.fits,
                "memory_mib": {k: round(v / 2**20, 1) for k, v in self.memory.items()},
                "time_s": {k: (round(v, 4) if k != "flops" else v) for k, v in self.time.items()}}


def p_params(s: Setup) -> int:
    """G_P: the P matrices of q/k/v/o in every layer, r x out_features each."""
    sh = s.shape
    return sh.layers * s.rank * (sh.d_q + 2 * sh.d_kv + sh.hidden)


def trainable_params(s: Setup) -> int:
    return s.generator_params + p_params(s)


def activation_elements(s: Setup) -> float:
    """Elements saved for backward by the frozen decoder's layers: B T L (3h + 5 d_q + 3I) (see the docstring)."""
    sh = s.shape
    return s.micro_batch * s.seq_len * sh.layers * (3 * sh.hidden + 5 * sh.d_q + 3 * sh.intermediate)


def memory(s: Setup, hw: Hardware) -> dict:
    sh, w, b = s.shape, s.world, DTYPE_BYTES[s.dtype]
    g = trainable_params(s)
    if s.partitioned:
        whole = sh.small_params(s.persistence_threshold)
        frozen = ((sh.params - whole) / w + whole) * b
        if s.partitioning == "hpz":             # + the secondary partition, over the node's n ranks
            frozen += (sh.params - whole) / s.ranks_per_node * b
        used = gathers(s)
        gathered = max(used["embedding"], used["kept"]) * b if w > 1 else 0.0
    else:
        frozen, gathered = sh.params * b, 0.0
    per_state = 16 if b == 4 else 18
    whole = b if s.stage == 2 else 0            # stage 2: the trainable weights whole on every rank
    tokens = s.micro_batch * s.seq_len
    if s.activation_checkpointing:
        activations = tokens * b * (sh.layers * sh.hidden + activation_elements(s) / (tokens * sh.layers))
    else:
        activations = activation_elements(s) * b
    out = {"runtime": hw.runtime_bytes, "comm": hw.comm_bytes if w > 1 else 0.0, "frozen": frozen,
           "gathered": hw.gathered_factor * gathered, "trainable": g * (whole + (per_state - whole) / w),
           "activations": activation_factor(s, hw) * activations}
    out["peak"] = sum(out.values())
    return out


def activation_factor(s: Setup, hw: Hardware) -> float:
    """a_act of the setup's ZeRO stage (``Hardware.stage3_activation_factor`` under stage 3)."""
    if s.stage == 3 and hw.stage3_activation_factor is not None:
        return hw.stage3_activation_factor
    return hw.activation_factor


def bandwidths(s: Setup, hw: Hardware) -> tuple[float, float]:
    """(BW of a collective over all ranks, BW of the frozen base's gathers): the inter-node bandwidth when the
    ranks span nodes; hpz gathers the base from its node's secondary partition, at ``Hardware.bandwidth``."""
    world = (hw.inter_node_bandwidth or hw.bandwidth) if s.multi_node else hw.bandwidth
    return world, hw.bandwidth if s.partitioning == "hpz" else world


def flops(s: Setup) -> float:
    sh, bt = s.shape, s.micro_batch * s.seq_len
    base = bt * (6 if s.activation_checkpointing else 4) * sh.matmul_params
    attention = 12 * s.micro_batch * s.seq_len ** 2 * sh.d_q * sh.layers
    injection = 6 * bt * sh.layers * s.rank * (2 * sh.hidden + sh.d_q + 2 * sh.d_kv + sh.hidden)
    generator = 6 * s.micro_batch * (N_QUERIES * (s.generator_params - s.generator_head_params)
                                     + s.generator_head_params)
    return base + attention + injection + generator


def gathers(s: Setup) -> dict:
    """The frozen base's all-gathers in one zero3 step (elements and calls), by DeepSpeed's rule: every
    partitioned module is gathered at its forward; it is released after it unless it is used again within
    ``reuse_distance`` elements of later use (DeepSpeed's trace), and then gathered again for its backward.
    A decoder module i is used again at its backward after the modules behind it, twice (their forward, then
    their backward): kept iff 2 x (elements after i) < reuse_distance. The embedding has no backward (the
    token ids carry no gradient). Parameters under the persistence threshold are whole and never gathered.

        embedding  the table's elements when partitioned (gathered alone, at the start)
        kept       elements gathered once and held from forward to backward (the peak's gathered term)
        elements   elements gathered per step: forward all + backward the released ones
        calls      collectives per step: one per gathered module and pass"""
    sizes = s.shape.step_modules()
    part = [n >= s.persistence_threshold for n in sizes]
    embedding = sizes[0] if part[0] else 0
    kept = elements = calls = 0
    after = 0
    for n, p in reversed(list(zip(sizes[1:], part[1:]))):
        if p:
            again = 2 * after < s.reuse_distance
            kept += n if again else 0
            elements += n if again else 2 * n
            calls += 1 if again else 2
        after += n
    return {"embedding": embedding, "kept": kept, "elements": elements + embedding, "calls": calls + bool(embedding)}


def trainable_modules(s: Setup) -> int:
    """The modules holding trainable parameters: the injection's P (q/k/v/o in every layer) and the generator's."""
    return 4 * s.shape.layers + s.generator_modules


def hooked_modules(s: Setup) -> int:
    """M: the modules holding ZeRO-3 parameters, each with ZeRO-3's hooks (see the docstring)."""
    return (s.shape.modules if s.partitioned else 0) + (trainable_modules(s) if s.stage == 3 else 0)


def step_time(s: Setup, hw: Hardware) -> dict:
    sh, w, b = s.shape, s.world, DTYPE_BYTES[s.dtype]
    passes = 3 if s.activation_checkpointing else 2
    f = flops(s)
    g = trainable_params(s)
    gather = 0.0
    bw_world, bw_frozen = bandwidths(s, hw)
    if w > 1:
        frozen = gathers(s) if s.partitioned else {"elements": 0, "calls": 0}
        n = s.ranks_per_node if s.partitioning == "hpz" else w     # hpz: a gather among the node's n ranks
        # the trainable weights (a few MB) are held from forward to backward: gathered once (stage 3, a call
        # per module holding them), or all-gathered once after the optimiser step (stage 2, one call)
        gather = ((n - 1) / n * frozen["elements"] * b / bw_frozen + (w - 1) / w * 4 * g / bw_world
                  + (frozen["calls"] + (trainable_modules(s) if s.stage == 3 else 1)) * hw.latency)
    reduce = (w - 1) / w * g * 4 / bw_world
    if w == 1 and s.partitioned and hw.copy_bandwidth:
        gather = gathers(s)["elements"] * b / hw.copy_bandwidth
    k = s.accumulation
    busy = hw.busy_slowdown if w > 1 else 1.0
    hooked = hooked_modules(s)
    out = {"compute": k * busy * f / hw.flops, "elementwise": k * busy * activation_elements(s) * hw.element_s,
           "gather": k * gather, "reduce": k * reduce, "optimiser": g / w * hw.optim_s_per_param,
           "overhead": k * (passes * (hooked * hw.module_overhead_s + sh.layers * hw.layer_overhead_s)
                            + hw.step_overhead_s + (hw.sync_overhead_s if w > 1 else 0.0))}
    out["step"] = sum(out.values())
    out["flops"] = f
    return out


def plan(s: Setup, hw: Hardware = CPU) -> Plan:
    """Memory and step time of ``s`` on ``hw`` (see the module docstring for every formula)."""
    problems = s.validate()
    if problems:
        raise ValueError("cannot plan: " + "; ".join(problems))
    return Plan(s, hw, memory(s, hw), step_time(s, hw))


PARTITIONINGS = ("zero3", "hpz", "replicated")
"""The places of the frozen base the planner chooses among (``engine.partitioning`` but 'auto'). On one node
hpz plans as zero3 with more memory: at equal time the first listed wins."""


def choose(s: Setup, hw: Hardware, checkpointing: tuple[bool, ...] | None = None,
           partitionings: tuple[str, ...] = PARTITIONINGS) -> tuple[Plan, str]:
    """The fastest option that fits on ``hw``, and why: among ``partitionings`` (zero3, a replicated frozen
    base), and with ``checkpointing`` (e.g. (False, True)) activation checkpointing off or on as well (default:
    as ``s`` has it). Recomputing the activations costs a forward, so it is chosen only where the activations
    do not fit otherwise. Nothing fits: the option that needs the least memory, with what to change."""
    both = checkpointing is not None and len(set(checkpointing)) > 1
    options = [(p, ac) for p in partitionings for ac in (checkpointing or (s.activation_checkpointing,))]
    plans = [plan(Setup(**{**asdict(s), "shape": s.shape, "partitioning": p, "activation_checkpointing": ac}), hw)
             for p, ac in options]

    def name(p: Plan) -> str:
        ac = p.setup.activation_checkpointing
        return p.setup.partitioning + ((" with" if ac else " without") + " activation checkpointing" if both else "")

    fitting = [p for p in plans if p.fits]
    if not fitting:
        least = min(plans, key=lambda p: p.memory["peak"])
        return least, (f"nothing fits: the smallest, {name(least)}, needs "
                       f"{least.memory['peak'] / 2**30:.1f} GiB per rank, {least.budget / 2**30:.1f} GiB available; "
                       + ("add ranks" if least.setup.activation_checkpointing
                          else "add ranks or use activation checkpointing"))
    best = min(fitting, key=lambda p: p.time["step"])
    others = [f"{name(p)} would take {p.time['step']:.3g} s/step" if p.fits
              else f"{name(p)} does not fit ({p.memory['peak'] / 2**30:.1f} GiB)" for p in plans if p is not best]
    why = f"{name(best)}: {best.time['step']:.3g} s/step, {best.memory['peak'] / 2**30:.1f} GiB per rank; " + "; ".join(others)
    return best, why


def relative_error(planned: float, measured: float) -> float:
    """(planned - measured) / measured."""
    if measured <= 0 or math.isnan(measured):
        raise ValueError(f"measured value must be > 0, got {measured}")
    return (planned - measured) / measured
