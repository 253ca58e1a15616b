"""One training step (forward + backward) of the ways to put a rank-r update into a frozen LLM.

    python benchmarks/injection.py --json                 (dropout 0.05)
    python benchmarks/injection.py --json --dropout 0     (no dropout anywhere)
    python benchmarks/injection.py --json --zero3 1,2     (also the training path: ZeRO-3, 1 and 2 ranks)
    python benchmarks/injection.py --json --device cuda --dtype bfloat16 --peak-tflops 989 --shape llama-2-7b-shape
                                                          (a GPU: adds each variant's MFU; benchmarks/gpu.sh runs the set)

Side by side in one run, on a SmolLM2-135M-shaped Llama with random weights (hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, vocab 49152; ``--shape``: another of ``cora.llm.SHAPES``), batch 8,
sequence 128, r=16 on q/k/v/o:

  frozen  the frozen LLM, gradients only w.r.t. its input embeddings (the floor)
  lora    this project's own LoRA (``adapter: lora``, method=tallrec): one shared A and P per module,
          the like-for-like LoRA (same injection code, same dropout as cora)
  peft    peft LoRA, same rank and targets, its dropout modules replaced by this project's dropout
          (``cora.injection.adapter_dropout``, same rate): torch's Bernoulli sampler on the CPU costs
          ~30x the rank-16 product it feeds, which would otherwise be most of the difference measured
  cora    CoRA: the paper's generator (Q-Former, 8 layers, hidden 512) + per-sample injection
  naive   per-sample merged weights: W_b = W + scale * P A_b^T materialised, then bmm

Every variant with an adapter drops out its input at the same rate with the same implementation (peft
per module, as peft does; lora and cora once per layer input, shared by q/k/v, as this project's
injection does). All score the same way (the "Yes" logit at the last position, BCE loss), so the
ratios measure the adapters, not the head. ``frozen_full_logits`` is the frozen LLM through the
ordinary HF head (full-vocabulary logits at every position), for reference.

The training path (``--zero3 1,2``): frozen, lora and cora again, each as the trainer builds it
(``trainer.engine``: the LLM built partitioned under ``deepspeed.zero.Init``, the "Yes" row gathered,
``deepspeed.initialize`` with AdamW on the trainable parameters, ZeRO-3 on gloo) in W processes on this
host, each rank with the same batch size, and timed by the trainer's own step (``trainer.worker.train_step``:
forward, backward with ZeRO-3's gradient reduce-scatter, optimiser step). ``frozen`` there is the
frozen LLM with one trainable scalar added to its logit (DeepSpeed needs a parameter to train; its
optimiser step is nothing), its input embeddings detached with gradients (as in one process).
``cora_per_module`` is CoRA with ZeRO-3 hooking each of the generator's Q-Former submodules
(``leaves=()``), as the trainer did before it hooked the Q-Former as one module (``trainer.engine.leaf_modules``):
``cora_over_cora_per_module`` is what that saves. A repetition's time is the slowest rank's;
``zero3.W.ratios`` hold the medians over repetitions of the forward + backward ratios (what one process
measures) and of the whole steps' (``*_step``). ``--partitioning replicated``: the frozen LLM whole on every
rank instead of partitioned (``engine.partitioning``), the generator and P under ZeRO stage 2 (``--zero-stage``,
``engine.zero_stage``); ``cora_per_module`` is then replaced by ``cora_stage3`` (CoRA with them under ZeRO-3, as
the trainer ran a replicated base before 2026-12-04; ``cora_over_cora_stage3``), or ``cora_stage2`` with
``--zero-stage 3``. ``--partitioning hpz``: partitioned, plus hpZ's secondary partition over the ranks (all on
this one host: its gathers move the same bytes as zero3's). ``--leaf-layers``: ZeRO-3 hooks each decoder layer as one module (``engine.leaf_layers``).

Throughput: ``tokens_per_s`` of each variant's median step (the training path: per rank, whole steps) and, with
``--peak-tflops``, ``mfu`` = 4 N_mm B T / (step s x peak), N_mm the decoder's matmul parameters.

Timing: after warm-up, each repetition runs every variant once, in an order rotated by one per
repetition (no variant always runs first or after the same one). A ratio is taken within each
repetition (the two steps ran seconds apart) and reported as the median over repetitions with its
spread (min, max): ``ratios.cora_over_frozen``, ``ratios.cora_over_lora_same_dropout``,
``ratios.cora_over_peft``, ``spread`` beside them.

Memory: every process keeps the memory a step frees, as the trainer's workers do (``run.keep_freed_memory``,
``cora.allocator``); ``--glibc-defaults`` runs with glibc's allocator as it comes (the figures before
2026-12-03). ``page_faults`` (and ``zero3.W.page_faults``, the most of any rank) hold each variant's median
minor page faults per step: fresh pages the step touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cora.injection import InjectedLinear, InjectionConfig, adapter_dropout  # noqa: E402
from cora.llm import SHAPES, build_preset, load_tokenizer  # noqa: E402
from cora.methods import Method  # noqa: E402
from cora.scoring import Batch, CoRAModel  # noqa: E402
from trainer.planner import shape_of  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class NaiveLinear(nn.Module):
    """The obvious implementation: build W + scale * P A_b^T per sample and multiply by it."""

    def __init__(self, injected: InjectedLinear):
        super().__init__()
        self.inner = injected

    def forward(self, x):
        m = self.inner
        a = m.variant._a(m)                                                  # (B, d_in, r), scaled
        w = m.base.weight.unsqueeze(0) + torch.matmul(m.lora_P, a.transpose(1, 2))  # (B, out, in)
        x = F.dropout(x, m.dropout, m.training)  # (the naive path also drops out the base input)
        y = torch.bmm(x, w.transpose(1, 2))                                 # (B, T, out)
        return y if m.base.bias is None else y + m.base.bias


def make_naive(model: CoRAModel) -> CoRAModel:
    names = {id(m): n for n, m in model.llm.named_modules()}
    for m in model.injection.modules:
        parent, _, attr = names[id(m)].rpartition(".")
        setattr(model.llm.get_submodule(parent), attr, NaiveLinear(m))
    return model


class SameDropout(nn.Module):
    """peft's lora_dropout replaced by this project's adapter dropout (same rate, same mask generator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        h, factor = adapter_dropout(x, self.p, self.training)
        return h if factor == 1.0 else h * factor


def same_dropout(peft_model, p: float) -> int:
    """Replace every peft LoRA dropout module by SameDropout(p); returns how many were replaced."""
    n = 0
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key in list(drops):
                drops[key] = SameDropout(p)
                n += 1
    return n


def yes_head(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits((hidden[:, -1] @ w).float(), labels)


def build(args):
    """The variants' steps (those not in ``--skip``) and the models they train. The LLM is built once
    (``build_preset``: seeded random weights) and copied for each variant that needs one of its own."""
    tok = load_tokenizer("smollm2")
    yes = tok(" Yes", add_special_tokens=False).input_ids[-1]
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    base = build_preset(args.shape, tok, dtype, seed=0).requires_grad_(False).to(dev).train()
    new = lambda: copy.deepcopy(base)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=g).to(dev)
    labels = torch.randint(0, 2, (args.batch,), generator=g).float().to(dev)
    emb = torch.randn(args.batch, 256, generator=g).to(dev)
    batch = Batch(ids, torch.full((args.batch,), args.seq, device=dev), emb, emb.clone(), labels)
    inj = InjectionConfig(rank=args.rank, alpha=2 * args.rank, dropout=args.dropout, targets=TARGETS)

    frozen = base
    w_yes = frozen.get_output_embeddings().weight[yes].detach().clone()
    steps, models = {}, [frozen]

    def step_frozen():
        x = frozen.get_input_embeddings()(ids).detach().requires_grad_()
        h = frozen.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
        yes_head(h, w_yes, labels).backward()

    def step_full_logits():
        x = frozen.get_input_embeddings()(ids).detach().requires_grad_()
        logits = frozen(inputs_embeds=x, use_cache=False).logits             # (B, T, V)
        F.binary_cross_entropy_with_logits(logits[:, -1, yes].float(), labels).backward()

    steps["frozen"] = step_frozen
    if "lora" not in skip:
        lora = CoRAModel(new(), yes, 256, 256, replace(inj, adapter="lora"), method="tallrec").to(dev, dtype).train()
        steps["lora"], models = (lambda: lora.loss(batch)[0].backward()), models + [lora]
    if "peft" not in skip:
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(new(), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                      lora_dropout=args.dropout, target_modules=TARGETS))
        replaced = same_dropout(peft_model, args.dropout)
        assert replaced == len(TARGETS) * frozen.config.num_hidden_layers, replaced
        peft_model.train()

        def step_peft():
            h = peft_model.base_model.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            yes_head(h, w_yes, labels).backward()
        steps["peft"], models = step_peft, models + [peft_model]
    if "cora" not in skip:
        cora = CoRAModel(new(), yes, 256, 256, inj).to(dev, dtype).train()
        steps["cora"], models = (lambda: cora.loss(batch)[0].backward()), models + [cora]
    if "naive" not in skip:
        naive = make_naive(CoRAModel(new(), yes, 256, 256, inj)).to(dev, dtype).train()
        steps["naive"], models = (lambda: naive.loss(batch)[0].backward()), models + [naive]
    if "frozen_full_logits" not in skip:
        steps["frozen_full_logits"] = step_full_logits
    for m in models:           # this project's adapters with non-zero P, as after some training
        if isinstance(m, CoRAModel):
            for p in m.injection.parameters():
                nn.init.normal_(p, std=0.02)
    return {k: steps[k] for k in VARIANTS if k in steps}, models


VARIANTS = ("frozen", "lora", "peft", "cora", "naive", "frozen_full_logits")


class FrozenFloor(Method):
    """The frozen LLM in the trainer's engine: no adapter, one trainable scalar on the logit (DeepSpeed trains
    something), gradients to the detached input embeddings (the floor of every adapter's backward)."""

    name = "frozen"

    def attach(self, model, injection, generator, user_dim, item_dim):
        model.injection, model.generator = None, None
        model.floor = nn.Parameter(torch.zeros(1))      # not 0-d: DeepSpeed broadcasts a bf16 parameter as bytes

    def trainable(self, model):
        return [model.floor]

    def inputs(self, model, batch):
        return {"inputs_embeds": model.llm.get_input_embeddings()(batch.input_ids).detach().requires_grad_()}

    def score(self, model, batch, hidden):
        return model.yes_logit(hidden) + model.floor


ZERO3_VARIANTS = ("frozen", "lora", "cora", "cora_per_module", "cora_stage3", "cora_stage2")
"""Every variant the training path can build (``training_engines``); ``zero3_variants`` picks a run's four."""


def stage_setting(args) -> dict:
    """``--zero-stage`` as engine settings: {} for auto, else {"zero_stage": 2 or 3}."""
    return {} if args.zero_stage == "auto" else {"zero_stage": int(args.zero_stage)}


def zero_stage(args) -> int:
    """The ZeRO stage the training path's variants run, as the trainer resolves it (``EngineConfig.stage``)."""
    from trainer.engine import EngineConfig
    return EngineConfig(partitioning=args.partitioning, **stage_setting(args)).stage


def zero3_variants(args) -> tuple[str, ...]:
    """frozen, lora, cora and the CoRA that cora is compared with: with a partitioned base, the Q-Former hooked
    per module; with a replicated one, the trainable part under the other ZeRO stage (``--zero-stage``)."""
    if args.partitioning != "replicated":             # zero3, hpz
        return ZERO3_VARIANTS[:4]
    return ZERO3_VARIANTS[:3] + (("cora_stage2",) if zero_stage(args) == 3 else ("cora_stage3",))


def zero3_rank(rank: int, world: int, args, port: int, out: str) -> None:
    """One rank of the training-path measurement (spawned W times); rank 0 writes the times to ``out``."""
    import os
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # DeepSpeed's build messages: --json's stdout is the JSON only
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from trainer.engine import select_accelerator
    select_accelerator(args.device)
    allocator(args)
    import torch.distributed as dist

    from trainer import engine as eng
    from trainer.worker import train_step
    torch.set_num_threads(max(1, args.threads // world))
    eng.init_distributed(args.device)
    names = zero3_variants(args)
    engines, raw = training_engines(args, world, names)
    times: dict[str, list] = {k: [] for k in names}
    for rep in range(args.warmup + args.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            dist.barrier()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            record = train_step(engines[name], raw)
            if rep >= args.warmup:
                times[name].append((record["forward"] + record["backward"], record["seconds"],
                                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, times)
    if rank == 0:      # a repetition lasts as long as its slowest rank
        slowest = {k: [tuple(max(r[k][i][j] for r in everyone) for j in (0, 1, 2)) for i in range(args.reps)]
                   for k in names}
        Path(out).write_text(json.dumps(slowest))
    dist.destroy_process_group()


def training_engines(args, world: int, names) -> tuple[dict, dict]:
    """The engines of ``names`` (of ``ZERO3_VARIANTS``) as the trainer builds them (``trainer.engine``, this
    process one of ``world`` ranks, its process group started), and one raw batch of ``args.batch`` x ``args.seq``
    random tokens (``trainer.worker.train_step``'s input). ``args.auto_sizes``: ZeRO-3's persistence threshold and
    buckets sized to the model (``engine.persistence_threshold`` and ``prefetch_bucket_size`` 'auto', as the GPU
    configs set them), else DeepSpeed's defaults with nothing persistent."""
    import numpy as np

    from cora.config import from_dict
    from cora.generator import GeneratorConfig
    from cora.llm import resolve_answer_token
    from trainer import engine as eng
    from trainer.config import TrainConfig
    sizes = {"persistence_threshold": "auto", "prefetch_bucket_size": "auto"} if args.auto_sizes else {}
    cfg = from_dict(TrainConfig, {"llm": {"name": args.shape, "dtype": args.dtype},
                                  "engine": {"micro_batch_size": args.batch, "bf16": args.dtype == "bfloat16",
                                             "partitioning": args.partitioning, **stage_setting(args), **sizes},
                                  "run": {"workers": world, "device": args.device}})
    hidden = shape_of(args.shape).hidden
    ds = eng.ds_config(cfg.engine, world, hidden)
    inj = InjectionConfig(rank=args.rank, alpha=2 * args.rank, dropout=args.dropout, targets=TARGETS)
    engines = {}
    for name in names:
        torch.manual_seed(0)
        llm, tok = eng.build_llm(cfg.llm, ds, args.partitioning)
        yes = resolve_answer_token(tok)
        method = {"frozen": FrozenFloor(), "lora": "tallrec"}.get(name, "cora")
        model = CoRAModel(llm, yes, 256, 256, replace(inj, adapter="lora") if name == "lora" else inj,
                          GeneratorConfig(), answer_weight=eng.gathered_answer_row(llm, yes), method=method)
        leaves = () if name == "cora_per_module" else eng.LEAVES
        own = ds if name not in ("cora_stage2", "cora_stage3") else eng.ds_config(
            replace(cfg.engine, zero_stage=int(name[-1])), world, hidden)
        engines[name] = eng.initialize(model, own, cfg.optim, 1000, leaves=leaves, leaf_layers=args.leaf_layers)[0]
    g = np.random.default_rng(0)
    raw = {"input_ids": g.integers(0, 49152, (args.batch, args.seq)), "lengths": np.full(args.batch, args.seq),
           "user_emb": g.standard_normal((args.batch, 256), dtype=np.float32),
           "item_emb": g.standard_normal((args.batch, 256), dtype=np.float32),
           "labels": g.integers(0, 2, args.batch).astype(np.float32)}
    return engines, raw


def zero3(args) -> dict:
    """The training path at each world size of ``--zero3``: per W, the per-repetition ratios' medians and
    spreads, forward + backward and whole steps."""
    import socket
    import tempfile

    import torch.multiprocessing as mp
    result = {}
    for world in [int(w) for w in args.zero3.split(",")]:
        with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            out = str(Path(tmp) / "times.json")
            mp.spawn(zero3_rank, args=(world, args, port, out), nprocs=world)
            slowest = json.loads(Path(out).read_text())
        entry = {"ranks": world, "threads_per_rank": max(1, args.threads // world), "partitioning": args.partitioning,
                 "zero_stage": zero_stage(args),
                 "leaf_layers": args.leaf_layers, "auto_sizes": args.auto_sizes,
                 "page_faults": {k: int(statistics.median(t[2] for t in v)) for k, v in slowest.items()}}
        for j, suffix in ((0, ""), (1, "_step")):
            times = {k: [t[j] for t in v] for k, v in slowest.items()}
            part = ratios(times)
            entry[f"median_s{suffix}"] = {k: round(statistics.median(v), 4) for k, v in times.items()}
            entry.setdefault("ratios", {}).update({k + suffix: v for k, v in part["ratios"].items()})
            entry.setdefault("spread", {}).update({k + suffix: v for k, v in part["spread"].items()})
        entry.update(throughput(times, args))      # of the whole steps, per rank
        result[str(world)] = entry
        if not args.json:
            print(f"zero3 {world} rank(s): {entry['ratios']}", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--shape", default="smollm2-135m-shape", choices=sorted(SHAPES),
                    help="the LLM's shape preset (cora.llm.SHAPES; random weights)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s in TFLOP/s: adds each variant's MFU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of each step")
    ap.add_argument("--dropout", type=float, default=0.05, help="adapter dropout of every variant with an adapter")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. naive)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--zero3", default="", help="also the training path under ZeRO-3 at these world sizes, e.g. 1,2")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="glibc's allocator as it comes (else the memory a step frees is kept, as the trainer does)")
    ap.add_argument("--zero3-only", action="store_true", help="only the training path (skip the one-process part)")
    ap.add_argument("--partitioning", default="zero3", choices=["zero3", "hpz", "replicated"],
                    help="the training path's frozen LLM: partitioned by ZeRO-3 (hpz: with a secondary partition) or whole on "
                         "every rank (engine.partitioning)")
    ap.add_argument("--zero-stage", default="auto", choices=["auto", "2", "3"],
                    help="the training path with --partitioning replicated: the ZeRO stage over the generator and P "
                         "(engine.zero_stage; auto: 2); the other stage's CoRA is timed beside it (cora_stage3 or "
                         "cora_stage2)")
    ap.add_argument("--leaf-layers", action="store_true",
                    help="the training path: ZeRO-3 hooks each decoder layer as one module (engine.leaf_layers)")
    ap.add_argument("--auto-sizes", action="store_true",
                    help="the training path: ZeRO-3's persistence threshold and buckets 'auto' (sized to the model, as "
                         "the GPU configs set them), else DeepSpeed's defaults")
    args = ap.parse_args()
    args.threads = torch.get_num_threads()
    args.matmul_params = shape_of(args.shape).matmul_params          # for the MFU
    allocator(args)
    result = {}
    if not args.zero3_only:
        torch.manual_seed(0)
        steps, models = build(args)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        faults: dict[str, list[int]] = {}
        times = timed(steps, models, args, sync, faults)
        del steps, models
        result = summary(times, args)
        result["page_faults"] = {k: int(statistics.median(v)) for k, v in faults.items() if v}
    if args.zero3:
        result = {**(result or summary({}, args)), "zero3": zero3(args)}
    print(json.dumps(result, indent=None if args.json else 2))


def allocator(args) -> None:
    """The trainer's allocator setting (``cora.allocator.keep_freed_memory``) unless ``--glibc-defaults``."""
    from cora.allocator import keep_freed_memory
    args.allocator = "glibc defaults" if args.glibc_defaults else (
        "freed memory kept (run.keep_freed_memory)" if keep_freed_memory() else "glibc defaults (not glibc?)")


def timed(steps: dict, models: list, args, sync, faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds per step of each variant, one per repetition; the order is rotated by one each repetition.
    ``faults``: filled with each timed step's minor page faults, per variant."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.warmup + args.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            for m in models:
                m.zero_grad(set_to_none=True)
            sync()
            f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            steps[name]()
            sync()
            dt = time.perf_counter() - t
            if rep >= args.warmup:
                times[name].append(dt)
                if faults is not None:
                    faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if not args.json:
                print(f"rep {rep} {name}: {dt:.3f}s", file=sys.stderr)
    return times


RATIOS = {"cora_over_frozen": ("cora", "frozen"), "cora_over_lora_same_dropout": ("cora", "lora"),
          "cora_over_peft": ("cora", "peft"), "lora_over_frozen": ("lora", "frozen"),
          "peft_over_frozen": ("peft", "frozen"), "naive_over_frozen": ("naive", "frozen"),
          "frozen_full_logits_over_frozen": ("frozen_full_logits", "frozen"),
          "cora_over_cora_per_module": ("cora", "cora_per_module"), "cora_over_cora_stage3": ("cora", "cora_stage3"),
          "cora_over_cora_stage2": ("cora", "cora_stage2")}


def summary(times: dict[str, list[float]], args) -> dict:
    """Per variant: median, min and max seconds; per ratio: the median over repetitions of the ratio within
    each repetition, and its (min, max)."""
    out = {"benchmark": "injection", "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "model": args.shape, "batch": args.batch, "seq": args.seq, "rank": args.rank,
           "dropout": args.dropout, "dropout_implementation": "cora.injection.adapter_dropout (every variant)",
           "targets": TARGETS, "reps": args.reps, "order": "rotated by one variant per repetition",
           "allocator": getattr(args, "allocator", None),
           "median_s": {k: round(statistics.median(v), 4) for k, v in times.items() if v},
           "min_s": {k: round(min(v), 4) for k, v in times.items() if v},
           "max_s": {k: round(max(v), 4) for k, v in times.items() if v},
           **ratios(times), **throughput(times, args)}
    return out


def throughput(times: dict[str, list[float]], args) -> dict:
    """Tokens per second of each variant's median step and, with ``--peak-tflops``, its MFU: 4 N_mm B T / (step
    s x peak), N_mm the LLM's decoder matmul parameters (``cora.plan.Shape.matmul_params``): the frozen base's
    forward (2 N_mm per token) and its backward to the activations (2 N_mm), the FLOPs every variant must do;
    the adapters' own (about 2% more here) and attention's score products are not counted."""
    n_mm = getattr(args, "matmul_params", None)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out: dict = {"tokens_per_s": {k: round(args.batch * args.seq / t) for k, t in med.items()}}
    if args.peak_tflops and n_mm:
        out["matmul_params"] = n_mm
        out["peak_tflops"] = args.peak_tflops
        out["mfu"] = {k: round(4 * n_mm * args.batch * args.seq / t / (args.peak_tflops * 1e12), 4)
                      for k, t in med.items()}
    return out


def ratios(times: dict[str, list[float]]) -> dict:
    """{"ratios": the median over repetitions of each RATIOS pair's per-repetition ratio, "spread": its (min,
    max)}, for the pairs both of whose variants were timed."""
    out: dict = {"ratios": {}, "spread": {}}
    for key, (a, b) in RATIOS.items():
        if times.get(a) and times.get(b):
            per_rep = [x / y for x, y in zip(times[a], times[b])]
            out["ratios"][key] = round(statistics.median(per_rep), 4)
            out["spread"][key] = [round(min(per_rep), 4), round(max(per_rep), 4)]
    return out


if __name__ == "__main__":
    main()
