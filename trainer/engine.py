"""DeepSpeed set-up inside one trainer worker: the frozen LLM partitioned from the start (or whole on every
rank), the injection and generator attached, and the engine that trains only the generator and P.

    ds = ds_config(...)                     # ZeRO-3 (stage 2 with a replicated base); bf16 on GPU, fp32 on CPU
    llm, tok = build_llm(...)               # zero3: under deepspeed.zero.Init, no rank holds the whole LLM;
                                            # replicated: whole on every rank, as buffers DeepSpeed leaves alone
    model = CoRAModel(llm, ..., answer_weight=gathered "Yes" row)
    engine = deepspeed.initialize(model, optimizer=AdamW(trainable), lr_scheduler=warm-up + cosine)

``DS_ACCELERATOR`` must be set before deepspeed is imported (``cpu`` here, ``cuda`` on GPUs);
``select_accelerator`` does it from the configured device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from cora.plan import PARTITIONINGS




def select_accelerator(device: str) -> None:
    """Point DeepSpeed at the CPU or CUDA accelerator (before the first ``import deepspeed``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")


def init_distributed(device: str) -> None:
    """DeepSpeed's process group: NCCL on CUDA, gloo on the CPU.

    On the CPU accelerator DeepSpeed 0.19.8 loads its shared-memory all-reduce (``deepspeed_shm_comm``, a C++
    extension) whenever a process group starts, compiling it with ninja into ``~/.cache/torch_extensions``
    where that cache does not have it yet.
    That kernel serves only tensor-parallel inference (``inference_all_reduce``); ZeRO-3 training never calls
    it. Building it took 35-50 s of a 2-core machine's first run (every fresh node, CI, the demo), so it is
    marked unbuildable here first (``deepspeed.ops.__compatible_ops__``, which DeepSpeed keeps as one dict
    for exactly such edits); the collectives go through gloo either way."""
    import deepspeed
    if device != "cuda":
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


@dataclass
class EngineConfig:
    """DeepSpeed settings of the trainer."""

    micro_batch_size: int = 8
    """Samples per rank per forward/backward (the paper: batch 8)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimiser step."""
    global_batch_size: int | None = None
    """Samples per optimiser step over all ranks; when set, gradient_accumulation is derived from it
    (global / (micro_batch_size x run.workers), which must be a whole number) so a scaling study can
    change run.workers and keep the batch. None: micro_batch_size x gradient_accumulation x workers."""
    bf16: bool = False
    """bf16 mixed precision (GPU); fp32 when false (the CPU path)."""
    gradient_clipping: float = 1.0
    """Max global gradient norm (0 = off)."""
    persistence_threshold: int | Literal["auto"] = 0
    """ZeRO-3 stage3_param_persistence_threshold: parameters with fewer elements stay gathered after
    use. 0 partitions everything (tiny test models); DeepSpeed's default is 1e5; 'auto': 10 x the LLM's
    hidden size h (its norms and biases stay whole on every rank, every matrix is partitioned)."""
    prefetch_bucket_size: int | Literal["auto"] | None = None
    """ZeRO-3 stage3_prefetch_bucket_size: parameter elements all-gathered ahead of their use. None:
    DeepSpeed's default (5e7); 'auto': 0.9 x h^2, and reduce_bucket_size h^2 (transformers' DeepSpeed
    rules), so a small model does not wait on one oversized bucket and a large one prefetches a layer's
    attention at a time."""
    activation_checkpointing: bool | Literal["auto"] = False
    """Recompute the LLM's activations in backward (non-reentrant), trading compute for memory. auto: the
    planner's choice (cora.plan.choose), made by ``cora train`` before the workers start: off where the
    activations fit in the run's device memory (recomputing costs a forward), on where they do not; every
    rank gets the same (a rank that recomputes issues ZeRO-3 gathers the others would not)."""
    leaf_layers: bool = False
    """ZeRO-3 hooks each decoder layer of the LLM as one module (``trainer.engine.leaf_modules``): one gather of
    the layer's parameters before its forward and one reduce after its backward, instead of hooks on each of its
    ~15 submodules (ZeRO-3 only: stage 2, ``zero_stage``, hooks no module). The inputs then carry a gradient
    (the embeddings' output, as CoLLM's and Laser's already do), which a leaf's backward hook needs to fire after
    its parameters' gradients. Measured on this CPU, 1 rank,
    replicated base (``benchmarks/injection.py --zero3 1 --zero3-only --partitioning replicated --leaf-layers``):
    README "Engine hooks". With ``partitioning: zero3`` a whole layer's frozen weights are gathered at once."""
    partitioning: Literal["zero3", "hpz", "replicated", "auto"] = "zero3"
    """Where the frozen LLM lives. zero3: partitioned over the ranks, every module all-gathered when used
    (memory N b / W, an all-gather of the model every step). hpz: zero3 plus a secondary partition of the
    frozen base over the ranks of one node (DeepSpeed's hpZ, ZeRO++: ``node_ranks``; memory N b (1/W + 1/n)):
    from the second step on every gather of it stays within a node, which only matters when the ranks span
    nodes. replicated: a whole copy on every rank, held as
    buffers that DeepSpeed leaves alone, and only the trainable generator and P data-parallel (memory N b,
    no gather of the base; ``zero_stage``). auto: the planner's choice (cora.plan.choose: the fastest that
    fits in the run's device memory), made by ``cora train`` before the workers start and printed with its
    reason."""
    node_ranks: int | Literal["auto"] = "auto"
    """Ranks per node: hpz's secondary group (DeepSpeed's zero_hpz_partition_size, which must divide the
    world) and, for the planner (partitioning auto), which collectives cross nodes. auto: in the workers, the
    ranks Ray Train put on the worker's node (the same on every node, or hpz is refused: ``node_ranks_agreed``);
    in the planner, every rank on one node (so it never picks hpz: set this on a multi-node cluster)."""
    zero_stage: Literal["auto", 2, 3] = "auto"
    """The ZeRO stage over the trainable generator and P. 3: partitioned, gathered by hooks on every module
    that holds them, before its forward and again before its backward. 2: whole on every rank (a few MB to
    150 MB), only their gradients (reduce-scattered in buckets) and AdamW's state partitioned: no module
    hooks at all, which is what a step bound by host time wants. auto: 2 with a replicated base. A
    partitioned base (zero3, or auto resolved to it) is always 3: ZeRO-3 must gather it. A replicated base
    takes 3 too (the earlier path, kept to measure against: ``benchmarks/injection.py --zero-stage``)."""

    def validate(self) -> list[str]:
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("micro_batch_size", "gradient_accumulation")
                    if getattr(self, k) < 1]
        if self.global_batch_size is not None and self.global_batch_size < 1:
            problems.append(f"global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        if self.global_batch_size is not None and self.gradient_accumulation != 1:
            problems.append(f"set global_batch_size or gradient_accumulation, not both (got {self.global_batch_size} "
                            f"and {self.gradient_accumulation}): the accumulation is derived from the global batch")
        if self.gradient_clipping < 0:
            problems.append(f"gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.partitioning not in (*PARTITIONINGS, "auto"):
            problems.append(f"partitioning must be {', '.join(PARTITIONINGS)} or auto, got {self.partitioning!r}")
        if self.node_ranks != "auto" and (not isinstance(self.node_ranks, int) or self.node_ranks < 1):
            problems.append(f"node_ranks must be >= 1 or 'auto', got {self.node_ranks!r}")
        if self.zero_stage not in ("auto", 2, 3):
            problems.append(f"zero_stage must be 2, 3 or auto, got {self.zero_stage!r}")
        elif self.zero_stage == 2 and self.partitioned:
            problems.append(f"zero_stage 2 needs the frozen base whole on every rank, but partitioning is "
                            f"{self.partitioning}: set engine.partitioning=replicated (or auto), or engine.zero_stage=3")
        problems += [f"{k} must be >= 0 or 'auto', got {getattr(self, k)}" for k in ("persistence_threshold",
                                                                                     "prefetch_bucket_size")
                     if isinstance(getattr(self, k), int) and getattr(self, k) < 0]
        return problems

    @property
    def stage(self) -> int:
        """The ZeRO stage a worker runs: ``zero_stage`` with 'auto' resolved by the (resolved) partitioning."""
        if self.partitioning == "auto":
            raise ValueError("engine.partitioning is 'auto': cora train resolves it before the workers start "
                             "(trainer.planner.resolve_auto)")
        if self.partitioned:                      # also where 'auto' chose it: ZeRO-3 must gather the base
            return 3
        return self.replicated_stage

    @property
    def partitioned(self) -> bool:
        """Whether ZeRO-3 partitions the frozen base (zero3, hpz)."""
        return self.partitioning in ("zero3", "hpz")

    @property
    def replicated_stage(self) -> int:
        """The stage a replicated base would run (``zero_stage``, 'auto' resolved: 2)."""
        return 2 if self.zero_stage == "auto" else self.zero_stage

    def persistence(self, hidden_size: int | None) -> int:
        """The persistence threshold in elements ('auto' resolved: 10 x hidden_size)."""
        return 10 * hidden_size if self.persistence_threshold == "auto" else self.persistence_threshold

    @property
    def needs_hidden_size(self) -> bool:
        """Whether ``ds_config`` needs the LLM's hidden size (a size set to 'auto')."""
        return "auto" in (self.persistence_threshold, self.prefetch_bucket_size)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step: gradient_accumulation, or global_batch_size / (micro-batch x
        world size) when a global batch is set (``cora train``'s preflight checks that it divides)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation
        return max(1, self.global_batch_size // (self.micro_batch_size * world_size))


def ds_config(cfg: EngineConfig, world_size: int, hidden_size: int | None = None,
              local_ranks: int | None = None) -> dict:
    """DeepSpeed's config; ``hidden_size``: the LLM's h, needed when a ZeRO-3 size is 'auto'; ``local_ranks``:
    the ranks on this worker's node (``node_ranks`` 'auto' with hpz; default: all of them)."""
    if cfg.needs_hidden_size and not hidden_size:
        raise ValueError("engine.persistence_threshold or engine.prefetch_bucket_size is 'auto': pass the LLM's "
                         "hidden size (trainer.planner.shape_of(llm.name).hidden)")
    accumulation = cfg.accumulation(world_size)
    zero = {"stage": cfg.stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.prefetch_bucket_size == "auto":
        zero["reduce_bucket_size"] = hidden_size ** 2
    if cfg.stage == 3:              # the gathers: stage 2 has none (its trainable weights are whole)
        zero["stage3_param_persistence_threshold"] = cfg.persistence(hidden_size)
        if cfg.prefetch_bucket_size == "auto":
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size ** 2)
        elif cfg.prefetch_bucket_size is not None:
            zero["stage3_prefetch_bucket_size"] = cfg.prefetch_bucket_size
    if cfg.partitioning == "hpz":
        n = min(local_ranks or world_size if cfg.node_ranks == "auto" else cfg.node_ranks, world_size)
        if world_size % n:
            raise ValueError(f"engine.partitioning=hpz: the secondary partition spans {n} ranks (engine.node_ranks="
                             f"{cfg.node_ranks}), which does not divide the {world_size} workers; place the same "
                             f"number of workers on every node, or set engine.node_ranks to a divisor of {world_size}")
        zero["zero_hpz_partition_size"] = n
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,     # our torch AdamW, on the trainable parameters only
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def node_ranks_agreed(local_ranks: int) -> int:
    """This worker's node-local rank count, checked to be every worker's (a collective: every rank calls it).
    hpz's secondary groups are whole nodes; with workers placed unevenly over the nodes, the ranks would build
    different groups and DeepSpeed would wait forever."""
    import torch.distributed as dist
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local_ranks)
    if len(set(counts)) > 1:
        raise ValueError(f"engine.partitioning=hpz with engine.node_ranks=auto needs the same number of workers on "
                         f"every node, but the nodes hold {sorted(set(counts))} (per rank: {counts}); place the "
                         f"workers evenly, or set engine.node_ranks to a number that divides every node's count")
    return local_ranks


def build_llm(llm_cfg, ds: dict, partitioning: str):
    """(the frozen LLM as ``partitioning`` ('zero3', 'hpz' or 'replicated') places it, tokenizer)."""
    if partitioning == "replicated":
        from cora.llm import load_llm
        llm, tok = load_llm(llm_cfg)
        return frozen_as_buffers(llm), tok
    if partitioning not in ("zero3", "hpz"):
        raise ValueError(f"partitioning must be zero3, hpz or replicated here, got {partitioning!r} ('auto' is "
                         "resolved by cora train before the workers start)")
    return build_partitioned_llm(llm_cfg, ds)


REPLICATED = "_cora_replicated"
"""Attribute of an LLM whose frozen weights ``frozen_as_buffers`` turned into buffers: those tensors (by
reference: the injection later moves the modules that hold them)."""


def frozen_as_buffers(llm):
    """Every frozen parameter of ``llm`` becomes a buffer of the same name holding the same tensor, so that
    DeepSpeed ZeRO-3, which partitions and gathers parameters only, leaves the whole frozen model on every
    rank: no all-gather of it, ever (persistent ZeRO-3 parameters would still be partitioned and gathered
    again around every optimiser step). A module's forward reads ``self.weight`` either way; tied weights
    stay one tensor. Parameters added later (the injection's P, the generator) are ZeRO-3's as usual."""
    held = {}
    for module in llm.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad:
                continue
            del module._parameters[name]
            module.register_buffer(name, held.setdefault(id(p), p.detach()), persistent=True)
    setattr(llm, REPLICATED, list(held.values()))
    return llm


def frozen_weights(llm) -> list:
    """The frozen LLM's weights: its frozen parameters (ZeRO-3 partitioned) or, when replicated, the buffers
    that hold them."""
    held = getattr(llm, REPLICATED, None)
    return [p for p in llm.parameters() if not p.requires_grad] if held is None else list(held)


def build_partitioned_llm(llm_cfg, ds: dict):
    """(LLM partitioned across the ranks, tokenizer).

    A local model directory (the 7B+ case) is loaded under ``deepspeed.zero.Init`` with transformers'
    ZeRO-3 integration: each weight shard is read, partitioned and freed, so no rank ever holds the
    whole model. Shape presets (``cora.llm.SHAPES``, 135M to 70B) are built by ``build_partitioned_shape``:
    constructed under ``zero.Init``, each rank then writes only its partition. The tiny test presets
    are built whole from their seed, then partitioned (``zero.Init(module=...)``): their weights are the
    ones transformers' own initialisation gives in a single process, which the tests compare against."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from cora.llm import PRESETS, REAL_PRESETS, SHAPES, load_llm
    if llm_cfg.name in SHAPES:
        return build_partitioned_shape(llm_cfg, ds)
    if llm_cfg.name in PRESETS or llm_cfg.name in REAL_PRESETS:
        llm, tok = load_llm(llm_cfg)
        deepspeed.zero.Init(module=llm, config_dict_or_path=ds, **hpz_group())
        return llm, tok
    hf_ds = HfDeepSpeedConfig(ds)          # while alive, from_pretrained loads under ZeRO-3
    # No dtype= here: with a config *and* a dtype, DeepSpeed 0.19.8's zero.Init ignores the dtype on an
    # accelerator without fp16 (the CPU) and partitions in bfloat16 (an operator-precedence slip in
    # Init._set_dtype). Without it the dtype comes from the config: bf16 when enabled, else fp32.
    with deepspeed.zero.Init(config_dict_or_path=ds, **hpz_group()):
        llm, tok = load_llm(llm_cfg)
    del hf_ds
    return llm, tok


def build_partitioned_shape(llm_cfg, ds: dict):
    """(a shape preset built partitioned, tokenizer): ``from_config`` inside ``deepspeed.zero.Init``
    with weight initialisation off (each module's parameters are allocated uninitialised and
    partitioned as soon as the module exists; the untouched full tensors are never paged in), then
    ``cora.llm.init_shape_weights`` writes this rank's slice of every parameter. A rank's peak is its
    share of the model plus one block of ``SHAPE_CHUNK`` values; the weights equal a single process's
    ``build_preset`` (the values are a function of the seed and the position, not of the rank)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from cora.llm import _DTYPES, build_config, init_shape_weights, load_tokenizer
    tok = load_tokenizer(llm_cfg.name)
    cfg = build_config(llm_cfg.name, tok, llm_cfg.attn_implementation)
    # prevent_arange_dtype_change keeps the RoPE buffers' explicit dtypes (transformers' own ZeRO-3 path
    # does the same); it must be entered before zero.Init
    with no_init_weights(), prevent_arange_dtype_change(), init_without_broadcast(ds):
        llm = AutoModelForCausalLM.from_config(cfg, dtype=_DTYPES[llm_cfg.dtype])
    llm.tie_weights()
    init_shape_weights(llm, llm_cfg.seed, locate=zero3_slice)
    for p in llm.parameters():
        # hpz: zero.Init cut each weight's secondary partition from the tensor as it was then, before the values
        # above were written into the primary partitions. Dropped, they are cut again from the whole weight at
        # its first gather (a gather over all ranks, once).
        if getattr(p, "ds_secondary_tensor", None) is not None:
            p.ds_secondary_tensor = None
    llm.requires_grad_(False)
    llm.eval()
    return llm, tok


def init_without_broadcast(ds: dict):
    """``deepspeed.zero.Init`` that partitions each new parameter without first broadcasting rank 0's
    values to every rank. zero.Init broadcasts so that random initialisations agree; here the values are
    written afterwards, the same on every rank, so the broadcast would only make every other rank page in
    each full parameter (measured on smollm2-135m-shape over 2 ranks: the receiving rank's build peaked
    at 1.96x its share with it, see benchmarks/build_shape.py) and send the whole model over the wire.
    This overrides ``Init._zero_init_param``, a DeepSpeed-internal method (deepspeed is pinned; the
    partitioned-build test measures the peak, so a change of that method shows up there)."""
    import deepspeed

    class InitWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    for name in ("_zero_init_param", "_convert_to_deepspeed_param"):
        if not hasattr(deepspeed.zero.Init, name):
            raise RuntimeError(f"deepspeed {deepspeed.__version__}'s zero.Init has no {name}; the partitioned "
                               "shape build was written against deepspeed 0.19.8 (pyproject.toml): install that")
    return InitWithoutBroadcast(config_dict_or_path=ds, **hpz_group())


def hpz_group() -> dict:
    """zero.Init's keyword for hpz's secondary group when this process made it already (a second model built
    in one process: DeepSpeed creates the group once and refuses to create it again); {} otherwise."""
    from deepspeed.utils import groups
    group = groups._get_zero_param_intra_parallel_group()
    return {} if group is None else {"zero_param_parallel_group": group}


def zero3_slice(param):
    """(this rank's elements of a ZeRO-3 parameter as a flat tensor, the index of the first in the
    flattened parameter, the parameter's numel). DeepSpeed pads the flattened parameter to a multiple of
    the partition group's size and gives rank r elements [r x part, (r + 1) x part); the padding is
    left out."""
    import deepspeed.comm as dist
    part = param.ds_tensor.ds_numel
    start = part * dist.get_rank(group=param.ds_process_group)
    valid = max(0, min(part, param.ds_numel - start))
    return param.ds_tensor.narrow(0, 0, valid), start, param.ds_numel


def gathered_answer_row(llm, token_id: int):
    """The LM head's row for the answer token, gathered from its ZeRO-3 partitions."""
    import deepspeed
    head = llm.get_output_embeddings()
    params = [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
    with deepspeed.zero.GatheredParameters(params):     # a no-op on a replicated base's whole buffers
        w = head.weight[token_id].detach().clone()
        b = None if getattr(head, "bias", None) is None else head.bias[token_id].detach().clone()
    return w, b


def partition_stats(params) -> dict:
    """Elements this rank holds of ZeRO-3 partitioned parameters, measured from DeepSpeed's partitions
    (``ds_tensor``: this rank's slice; ``ds_numel``: the full size); a tensor ZeRO-3 does not partition (a
    replicated base's buffers) is held whole. ``secondary``: the elements of hpz's secondary partitions
    (``ds_secondary_tensor``, made at a weight's first gather)."""
    params = list(params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    secondary = sum(p.ds_secondary_tensor.numel() for p in params if getattr(p, "ds_secondary_tensor", None) is not None)
    return {"held": int(held), "total": int(total), "share": held / max(total, 1), "secondary": int(secondary)}


LEAVES = ("generator.qformer",)
"""Modules ZeRO-3 treats as one (``leaf_modules``): the paper generator's Q-Former, 100 parameter-holding
submodules that would each be gathered, released and reduced by its own hooks."""


def leaf_modules(model, names=LEAVES) -> list[str]:
    """Mark the modules ``names`` of ``model`` that it has as ZeRO-3 leaves (DeepSpeed's
    ``set_z3_leaf_modules_by_name``): one hook per leaf gathers all its parameters before its forward and
    reduces all their gradients after its backward, instead of a hook per submodule. Measured on the
    SmolLM2-135M shape with the paper generator (``benchmarks/injection.py --zero3``,
    ``cora_over_cora_per_module``): a 2-rank step 4% shorter (median; every repetition shorter), at 1 rank
    within the noise. A leaf's reduce hook is a full
    backward hook, which fires only after its parameters' gradients when an input of the leaf requires a
    gradient (else it fires as soon as its outputs' gradients are ready): the Q-Former's input is the
    learned queries, so it does; a module fed only by data must not be a leaf. Returns the names marked."""
    from deepspeed.utils import set_z3_leaf_modules_by_name
    modules = dict(model.named_modules())
    present = [n for n in names if n in modules]
    if present:
        set_z3_leaf_modules_by_name(model, present)
    return present


def layer_names(model) -> tuple[str, ...]:
    """The qualified names, within ``model`` (a CoRAModel), of its LLM's decoder layers."""
    from cora.injection import decoder_layers
    layers = {id(m) for m in decoder_layers(model.llm)}
    return tuple(n for n, m in model.named_modules() if id(m) in layers)


def initialize(model, ds: dict, optim_cfg, total_steps: int, leaves=LEAVES, leaf_layers: bool = False):
    """The DeepSpeed engine over ``model`` with AdamW + warm-up/cosine on the trainable parameters; under
    ZeRO-3 the modules ``leaves`` hooked as one (``leaf_modules``), and each decoder layer too with
    ``leaf_layers`` (``EngineConfig.leaf_layers``: the model's inputs then carry a gradient); under stage 2
    (``EngineConfig.zero_stage``) no module is hooked and both are moot."""
    import deepspeed

    from cora.optim import build_optimizer
    if ds["zero_optimization"]["stage"] == 3:      # stage 2 hooks no module: nothing to hook as one
        if leaf_layers:
            leaves = tuple(leaves) + layer_names(model)
            model.inputs_with_grad = True
        leaf_modules(model, leaves)
    params = model.trainable_parameters()
    opt, sched = build_optimizer(params, optim_cfg, total_steps)
    engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt,
                                                 lr_scheduler=sched, config=ds)
    return engine, opt, sched
