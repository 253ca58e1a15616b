"""``cora plan``: per-rank memory and step time of a training configuration, before running it.

    cora plan --llm llama-2-7b-shape --workers 1,8 --micro-batch 8 --seq-len 256 --dtype bfloat16 \
        --activation-checkpointing auto --hardware h100 --partitioning auto
    cora plan --llm /models/llama-2-7b --workers 8 --json

The arithmetic is ``cora.plan`` (every formula and constant is stated there); this module resolves the
model's shape (a preset or a local directory's config.json), counts the generator's parameters (built
on the meta device: no memory) and prints one row per worker count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cora.plan import PARTITIONINGS

GENERATORS = {"demo": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
              "paper": {}}
"""The demo config's small generator and the paper's Q-Former (hidden 512, 8 layers, 8 heads)."""


def shape_of(llm: str):
    """cora.plan.Shape of a preset (as built: a shape's vocabulary raised to the tokenizer's) or of a local
    model directory's config.json."""
    from cora.llm import PRESETS, REAL_PRESETS, build_config, load_tokenizer, smollm2_dir
    from cora.plan import Shape
    if llm in PRESETS:
        return Shape.from_config(build_config(llm, load_tokenizer(llm)).to_dict())
    if llm in REAL_PRESETS:
        from transformers import AutoConfig
        from cora.llm import SMOLLM2_GGUF
        return Shape.from_config(AutoConfig.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF).to_dict())
    path = Path(llm).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"--llm {llm!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         f"nor a directory with a config.json")
    return Shape.from_config(json.loads(path.read_text()))


def generator_params(generator: str | dict, cf_dim: int, d_model: int, rank: int) -> tuple[int, int, int]:
    """(all parameters, those of the output projection, modules holding parameters) of the generator, built
    on the meta device."""
    import torch

    from cora.generator import CollaborativeWeightsGenerator, GeneratorConfig
    cfg = GeneratorConfig(**(GENERATORS[generator] if isinstance(generator, str) else generator))
    with torch.device("meta"):
        gen = CollaborativeWeightsGenerator(cfg, cf_dim, cf_dim, {d_model}, rank)
    modules = sum(1 for m in gen.modules() if any(True for _ in m.parameters(recurse=False)))
    return sum(p.numel() for p in gen.parameters()), sum(p.numel() for p in gen.heads.parameters()), modules


def setup_for(llm: str, world: int, micro_batch: int, seq_len: int, dtype: str = "float32",
              activation_checkpointing: bool = False, partitioning: str = "zero3", generator: str | dict = "demo",
              cf_dim: int = 64, rank: int = 16, persistence_threshold: int = 0, accumulation: int = 1,
              zero_stage: int = 2, node_ranks: int | None = None):
    """A cora.plan.Setup for a model name and the trainer's settings."""
    from cora.plan import Setup
    shape = shape_of(llm)
    total, head, modules = generator_params(generator, cf_dim, shape.hidden, rank)
    return Setup(shape=shape, world=world, micro_batch=micro_batch, seq_len=seq_len, dtype=dtype,
                 activation_checkpointing=activation_checkpointing, partitioning=partitioning,
                 generator_params=total, generator_head_params=head, generator_modules=modules, rank=rank,
                 persistence_threshold=persistence_threshold, accumulation=accumulation, zero_stage=zero_stage,
                 node_ranks=node_ranks)


def setup_of(cfg, partitioning: str, cf_dim: int, seq_len: int | None = None):
    """The cora.plan.Setup of a TrainConfig (its LLM, workers, micro-batch, dtype, generator, injection rank
    and ZeRO sizes and stage, its ranks per node: 'auto' plans one node); ``seq_len``: the prompt length to plan
    for (default data.max_length)."""
    e = cfg.engine
    return setup_for(cfg.llm.name, cfg.run.workers, e.micro_batch_size, seq_len or cfg.data.max_length,
                     cfg.llm.dtype, e.activation_checkpointing is True, partitioning, cfg.generator.__dict__, cf_dim,
                     cfg.injection.rank, e.persistence(shape_of(cfg.llm.name).hidden),
                     e.accumulation(cfg.run.workers), e.replicated_stage,
                     None if e.node_ranks == "auto" else e.node_ranks)


def hardware_of(cfg):
    """The planner's machine profile for the run's device (cora.plan.HARDWARE: cpu, or h100 for cuda)."""
    from cora.plan import HARDWARE
    return HARDWARE["h100" if cfg.run.device == "cuda" else "cpu"]


def checkpointing_options(cfg) -> tuple[bool, ...] | None:
    """What ``cora.plan.choose`` may pick for activation checkpointing: both when the config says auto,
    else None (as configured)."""
    return (False, True) if cfg.engine.activation_checkpointing == "auto" else None


def resolve_auto(cfg, cf_dim: int) -> str:
    """engine.partitioning and engine.activation_checkpointing 'auto' made concrete (cora.plan.choose: the
    fastest that fits); the choice and its reason, as one line for the driver's log ('' when neither is auto).
    A fixed value of one is kept while the other is chosen."""
    e = cfg.engine
    auto = [k for k in ("partitioning", "activation_checkpointing") if getattr(e, k) == "auto"]
    if not auto:
        return ""
    hw = hardware_of(cfg)
    best, why = choose_for(cfg, e.partitioning, hw, cf_dim)
    chosen = ", ".join(f"engine.{k}=auto -> {getattr(e, k)}" for k in auto)
    return f"{chosen} ({why}; planner: {hw.name})"


def choose_for(cfg, partitioning: str, hw, cf_dim: int):
    """(plan, reason) of ``cora.plan.choose`` for the config with ``partitioning`` ('auto': either) and its
    activation checkpointing ('auto': either); the config's engine is set to the choice (both concrete)."""
    from cora.plan import choose
    e = cfg.engine
    best, why = choose(setup_of(cfg, "zero3", cf_dim), hw, checkpointing_options(cfg),
                       PARTITIONINGS if partitioning == "auto" else (partitioning,))
    e.partitioning, e.activation_checkpointing = best.setup.partitioning, best.setup.activation_checkpointing
    return best, why


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict per-rank memory and step time (no training)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", required=True, help="a preset (e.g. llama-2-7b-shape) or a local model directory")
    p.add_argument("--workers", default="1,2", help="comma-separated world sizes")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample (the padded prompt length)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--activation-checkpointing", nargs="?", const="on", default="off", choices=["on", "off", "auto"],
                   help="recompute the activations in backward (the flag alone: on); auto: the planner's choice, "
                        "on only where the activations do not fit otherwise")
    p.add_argument("--partitioning", choices=[*PARTITIONINGS, "auto"], default="zero3",
                   help="auto: the fastest that fits, with the reason")
    p.add_argument("--node-ranks", type=int, help="ranks per node (default: every rank on one node): which "
                                                  "collectives cross nodes, and hpz's secondary group")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="demo")
    p.add_argument("--cf-dim", type=int, default=64, help="CF embedding size (user and item)")
    p.add_argument("--rank", type=int, default=16, help="injection rank r")
    p.add_argument("--persistence-threshold", type=int, default=0)
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2,
                   help="the ZeRO stage over the generator and P with a replicated base (engine.zero_stage; a "
                        "partitioned base is always 3)")
    p.add_argument("--hardware", choices=["cpu", "h100"], default="cpu")
    p.add_argument("--memory-gib", type=float, help="memory of one device, shared by up to the hardware's ranks per "
                                                    "device (default: the hardware's; cpu: 22 GiB for 2 ranks)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from cora.plan import HARDWARE, choose, plan
    hw = HARDWARE[args.hardware]
    if args.memory_gib is not None:
        hw = dataclasses.replace(hw, memory_bytes=args.memory_gib * 2**30)
    try:
        worlds = [int(w) for w in args.workers.split(",")]
    except ValueError:
        print(f"cora plan: --workers {args.workers!r} is not a comma-separated list of integers (e.g. 1,2,8)",
              file=sys.stderr)
        return 2
    rows = []
    for w in worlds:
        try:
            fixed = "zero3" if args.partitioning == "auto" else args.partitioning
            s = setup_for(args.llm, w, args.micro_batch, args.seq_len, args.dtype, args.activation_checkpointing == "on",
                          fixed, args.generator, args.cf_dim, args.rank, args.persistence_threshold,
                          zero_stage=args.zero_stage, node_ranks=args.node_ranks)
            free = "auto" in (args.partitioning, args.activation_checkpointing)
            p, why = (choose(s, hw, (False, True) if args.activation_checkpointing == "auto" else None,
                             PARTITIONINGS if args.partitioning == "auto" else (fixed,))
                      if free else (plan(s, hw), ""))
        except ValueError as e:
            print(f"cora plan: {e}", file=sys.stderr)
            return 2
        rows.append(dict(p.as_dict(), reason=why) if why else p.as_dict())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{args.llm}: {rows[0]['params']:,} parameters, {rows[0]['trainable_params']:,} trainable; {hw.name}")
    print("workers  partitioning  peak MiB/rank (frozen+gathered+trainable+activations+runtime+comm)  step s  fits")
    for r in rows:
        m, t = r["memory_mib"], r["time_s"]
        print(f"{r['setup']['world']:>7}  {r['setup']['partitioning']:<12}  {m['peak']:>10,.0f} ({m['frozen']:,.0f}+"
              f"{m['gathered']:,.0f}+{m['trainable']:,.0f}+{m['activations']:,.0f}+{m['runtime']:,.0f}+{m['comm']:,.0f})  "
              f"{t['step']:>8.3f}  {'yes' if r['fits'] else 'NO'}" + (f"  [{r['reason']}]" if "reason" in r else ""))
    return 0
