"""Where the trainer's step goes: one rank's ``trainer.worker.train_step`` of frozen / LoRA / CoRA (built as
``benchmarks/injection.py --zero3 1`` builds them, i.e. as ``cora train`` does), timed and profiled.

    python benchmarks/profile_step.py --json                                  (CPU, 135M shape, 8 x 128)
    python benchmarks/profile_step.py --json --batch 1 --seq 8                (the host's share alone: a GPU's regime)
    python benchmarks/profile_step.py --json --device cuda --dtype bfloat16 --partitioning replicated [--leaf-layers]

Per variant: the median step and its phases over ``--reps`` steps after ``--warmup``; the modules that carry
DeepSpeed's ZeRO-3 hooks (every module under the engine but those inside a ZeRO-3 leaf); then
``torch.profiler`` over ``--profile-steps`` steps: host and device seconds per step, the operators (and CUDA
runtime calls) with the most host time per step, their calls per step, and per step the kernel launches and
the calls that make the host wait for the device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize``, device-to-host copies). On a GPU a step whose device time is a small part of its
wall time is the host's: these counts say which host work it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from injection import ZERO3_VARIANTS, training_engines, zero_stage  # noqa: E402

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "Memcpy DtoH")


def hooked_modules(engine) -> int:
    """Modules with ZeRO-3's forward pre-hook (DeepSpeed hooks every module not inside a ZeRO-3 leaf); the
    project's own pre-hooks (``cora.injection.SharedDown`` on attention modules) are not counted."""
    return sum(1 for m in engine.module.modules()
               if any(getattr(h, "__name__", "") == "_pre_forward_module_hook" for h in m._forward_pre_hooks.values()))


def profiled(engine, raw: dict, steps: int, device: str, top: int) -> dict:
    """``torch.profiler`` over ``steps`` train steps: per-step host/device seconds, top operators, launches, waits."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from trainer.worker import train_step
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(engine, raw)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    # the device's own events (kernels, copies): an operator's device time is its kernels' again
    dev = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6 / steps

    def per_step(e) -> dict:
        return {"name": e.key, "calls": round(e.count / steps, 1), "host_ms": round(e.self_cpu_time_total / 1e3 / steps, 3),
                "device_ms": round(e.self_device_time_total / 1e3 / steps, 3)}
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_s": round(wall, 4), "device_s": round(dev, 4),
            "host_op_s": round(sum(e.self_cpu_time_total for e in events) / 1e6 / steps, 4),
            "kernel_launches": round(sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                             "cudaLaunchKernelExC")) / steps, 1),
            "waits": {w: round(sum(e.count for e in events if w in e.key) / steps, 1) for w in WAITS},
            "top": [per_step(e) for e in ranked[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--shape", default="smollm2-135m-shape", help="the LLM's shape preset (cora.llm.SHAPES)")
    ap.add_argument("--variants", default="frozen,cora", help=f"comma-separated, of {','.join(ZERO3_VARIANTS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (0: none)")
    ap.add_argument("--top", type=int, default=25, help="operators listed per variant")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--partitioning", default="zero3", choices=["zero3", "replicated"])
    ap.add_argument("--zero-stage", default="auto", choices=["auto", "2", "3"],
                    help="with --partitioning replicated: the ZeRO stage over the generator and P (engine.zero_stage; "
                         "auto: 2, which hooks no module)")
    ap.add_argument("--leaf-layers", action="store_true", help="ZeRO-3 hooks each decoder layer as one module")
    ap.add_argument("--auto-sizes", action="store_true",
                    help="ZeRO-3's persistence threshold and buckets 'auto' (sized to the model, as the GPU configs set "
                         "them; reduce buckets of h^2 elements): else DeepSpeed's defaults")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in ZERO3_VARIANTS]
    if bad or not names:
        ap.error(f"--variants {args.variants!r}: each must be one of {', '.join(ZERO3_VARIANTS)}")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    if args.json:                                   # DeepSpeed's messages to stderr: stdout is the JSON only
        out = os.fdopen(os.dup(1), "w")
        os.dup2(sys.stderr.fileno(), 1)
    from trainer import engine as eng
    from trainer.worker import train_step
    eng.select_accelerator(args.device)
    eng.init_distributed(args.device)
    engines, raw = training_engines(args, 1, names)
    result = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "device": args.device, "dtype": args.dtype,
              "partitioning": args.partitioning, "zero_stage": zero_stage(args), "leaf_layers": args.leaf_layers,
              "auto_sizes": args.auto_sizes,
              "variants": {}}
    for name in names:
        e = engines[name]
        records = [train_step(e, raw) for _ in range(args.warmup + args.reps)][args.warmup:]
        entry = {k: round(statistics.median(r[k] for r in records), 4) for k in ("seconds", "forward", "backward",
                                                                              "optimizer")}
        entry["hooked_modules"] = hooked_modules(e)
        if args.profile_steps:
            entry["profile"] = profiled(e, raw, args.profile_steps, args.device, args.top)
        result["variants"][name] = entry
    text = json.dumps(result, indent=None if args.json else 1)
    if args.json:
        print(text, file=out, flush=True)
    else:
        print(text)


if __name__ == "__main__":
    main()
