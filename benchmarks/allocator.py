"""What ``run.keep_freed_memory`` (``cora.allocator.keep_freed_memory``) is worth: one training step (forward +
backward) of the frozen LLM, this project's LoRA and CoRA on the SmolLM2-135M shape, in one process, with
glibc's allocator as it comes and as the trainer sets it, with the page faults each step takes.

The allocator cannot be set back once changed, so each side runs in a process of its own: ``--pairs`` pairs
of child processes, the two sides alternating and the order rotated per pair; every child builds the same
models (``benchmarks/injection.py``'s ``build``, seed 0) and times each variant ``--reps`` times after a
warm-up, the variants' order rotated per repetition. Reported: per side, the median over pairs of each
variant's median step and page faults; the per-pair ratios keep / default of each variant and CoRA / frozen
of each side, as median [min, max].

    python benchmarks/allocator.py --json [--pairs 3] [--reps 4] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("frozen", "lora", "cora")
SIDES = ("keep", "default")


def child(args) -> dict:
    """One side in this process: {variant: (median step s, median page faults per step)}."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import injection
    if args.child == "keep":
        from cora.allocator import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() changed nothing here (not glibc?)")
    torch.manual_seed(0)
    run = argparse.Namespace(batch=args.batch, seq=args.seq, rank=16, dropout=0.05, device="cpu", dtype="float32",
                             shape="smollm2-135m-shape", skip=",".join(set(injection.VARIANTS) - set(VARIANTS)),
                             warmup=1, reps=args.reps, json=True)
    steps, models = injection.build(run)
    faults: dict[str, list[int]] = {}
    times = injection.timed(steps, models, run, lambda: None, faults)       # rotated order, as injection.py
    return {k: (statistics.median(times[k]), statistics.median(faults[k])) for k in VARIANTS}


def spread(values: list[float]) -> list[float]:
    return [round(statistics.median(values), 4), round(min(values), 4), round(max(values), 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=4, help="timed steps of each variant per process")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for pair in range(args.pairs):
        for side in SIDES[pair % 2:] + SIDES[:pair % 2]:
            out = subprocess.run([sys.executable, __file__, "--child", side, "--reps", str(args.reps), "--batch",
                                  str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the {side} child failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not args.json:
                print(f"pair {pair} {side}: {runs[side][-1]}", file=sys.stderr)
    result = {"benchmark": "allocator", "model": "smollm2-135m-shape", "batch": args.batch, "seq": args.seq,
              "pairs": args.pairs, "reps": args.reps, "spread": "median, min, max over pairs",
              "step_s": {s: {k: round(statistics.median(r[k][0] for r in runs[s]), 4) for k in VARIANTS}
                         for s in SIDES},
              "page_faults_per_step": {s: {k: int(statistics.median(r[k][1] for r in runs[s])) for k in VARIANTS}
                                       for s in SIDES},
              "keep_over_default": {k: spread([a[k][0] / b[k][0] for a, b in zip(runs["keep"], runs["default"])])
                                    for k in VARIANTS},
              "cora_over_frozen": {s: spread([r["cora"][0] / r["frozen"][0] for r in runs[s]]) for s in SIDES},
              "lora_over_frozen": {s: spread([r["lora"][0] / r["frozen"][0] for r in runs[s]]) for s in SIDES}}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
