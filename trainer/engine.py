"""DeepSpeed ZeRO-3 set-up inside one trainer worker: the frozen LLM partitioned from the start, the
injection and generator attached, and the engine that trains only the generator and P.

    ds = ds_config(...)                     # ZeRO-3; bf16 on GPU, fp32 on CPU
    llm, tok = build_partitioned_llm(...)   # under deepspeed.zero.Init: no rank holds the whole LLM
    model = CoRAModel(llm, ..., answer_weight=gathered "Yes" row)
    engine = deepspeed.initialize(model, optimizer=AdamW(trainable), lr_scheduler=warm-up + cosine)

``DS_ACCELERATOR`` must be set before deepspeed is imported (``cpu`` here, ``cuda`` on GPUs);
``select_accelerator`` does it from the configured device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass




def select_accelerator(device: str) -> None:
    """Point DeepSpeed at the CPU or CUDA accelerator (before the first ``import deepspeed``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")


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
    persistence_threshold: int = 0
    """ZeRO-3 stage3_param_persistence_threshold: parameters with fewer elements stay gathered after
    use. 0 partitions everything (tiny test models); DeepSpeed's default is 1e5."""
    activation_checkpointing: bool = False
    """Recompute the LLM's activations in backward (non-reentrant), trading compute for memory."""

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
        return problems

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step: gradient_accumulation, or global_batch_size / (micro-batch x
        world size) when a global batch is set (``cora train``'s preflight checks that it divides)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation
        return max(1, self.global_batch_size // (self.micro_batch_size * world_size))


def ds_config(cfg: EngineConfig, world_size: int) -> dict:
    accumulation = cfg.accumulation(world_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": cfg.persistence_threshold,
                              "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,     # our torch AdamW, on the trainable parameters only
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_partitioned_llm(llm_cfg, ds: dict):
    """(LLM partitioned across the ranks, tokenizer).

    A local model directory (the 7B+ case) is loaded under ``deepspeed.zero.Init`` with transformers'
    ZeRO-3 integration: each weight shard is read, partitioned and freed, so no rank ever holds the
    whole model. Presets (tiny test models and SmolLM2-135M, at most 135M parameters) are built
    whole from their seed, then partitioned (``zero.Init(module=...)``): their weights are then the
    same as in a single process, so a run can be checked against one, and evaluated by one."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from cora.llm import PRESETS, REAL_PRESETS, load_llm
    if llm_cfg.name in PRESETS or llm_cfg.name in REAL_PRESETS:
        llm, tok = load_llm(llm_cfg)
        deepspeed.zero.Init(module=llm, config_dict_or_path=ds)
        return llm, tok
    hf_ds = HfDeepSpeedConfig(ds)          # while alive, from_pretrained loads under ZeRO-3
    # No dtype= here: with a config *and* a dtype, DeepSpeed 0.19.8's zero.Init ignores the dtype on an
    # accelerator without fp16 (the CPU) and partitions in bfloat16 (an operator-precedence slip in
    # Init._set_dtype). Without it the dtype comes from the config: bf16 when enabled, else fp32.
    with deepspeed.zero.Init(config_dict_or_path=ds):
        llm, tok = load_llm(llm_cfg)
    del hf_ds
    return llm, tok


def gathered_answer_row(llm, token_id: int):
    """The LM head's row for the answer token, gathered from its ZeRO-3 partitions."""
    import deepspeed
    head = llm.get_output_embeddings()
    params = [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
    with deepspeed.zero.GatheredParameters(params):
        w = head.weight[token_id].detach().clone()
        b = None if getattr(head, "bias", None) is None else head.bias[token_id].detach().clone()
    return w, b


def partition_stats(params) -> dict:
    """Elements this rank holds of ZeRO-3 partitioned parameters, measured from DeepSpeed's partitions
    (``ds_tensor``: this rank's slice; ``ds_numel``: the full size)."""
    params = list(params)
    held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return {"held": int(held), "total": int(total), "share": held / max(total, 1)}


def initialize(model, ds: dict, optim_cfg, total_steps: int):
    """The DeepSpeed engine over ``model`` with AdamW + warm-up/cosine on the trainable parameters."""
    import deepspeed

    from cora.optim import build_optimizer
    params = model.trainable_parameters()
    opt, sched = build_optimizer(params, optim_cfg, total_steps)
    engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt,
                                                 lr_scheduler=sched, config=ds)
    return engine, opt, sched
