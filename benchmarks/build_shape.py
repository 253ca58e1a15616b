"""Building a shape preset partitioned: the peak resident memory of each rank.

    python benchmarks/build_shape.py --json --llm smollm2-1.7b-shape --world 2
    python benchmarks/build_shape.py --json --llm llama-2-7b-shape --dtype bfloat16 --world 2
    python benchmarks/build_shape.py --json --llm smollm2-135m-shape --whole    (one process, built whole)

Starts ``--world`` rank processes (gloo on 127.0.0.1, no Ray); each builds the preset as a trainer
worker does (``trainer.engine.build_partitioned_llm``: ``from_config`` inside ``deepspeed.zero.Init``,
then its own slice of every weight) and reports, from ``/proc/self/status``:

  rss_before_mib   resident memory just before the build (torch, DeepSpeed, the tokenizer loaded)
  peak_mib         the process's high-water mark (VmHWM) after the build
  build_mib        peak_mib - rss_before_mib: what building cost this rank
  held_mib         the bytes of the LLM partitions this rank holds (``ds_tensor``)
  full_mib         the whole model's bytes (parameters x element size)

and ``build_over_share`` = max over ranks of build_mib / (full_mib / world). ``--hashes`` adds the
sha256 of each rank's slice of every parameter (for the test that compares them with a single
process's build). ``--whole`` builds the preset in one process instead (``cora.llm.load_llm``), for
comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def proc_status() -> dict:
    """VmRSS and VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024          # kB -> MiB
    return out


def slice_hashes(llm) -> dict:
    """{parameter name: sha256 of this rank's slice (or the whole tensor)} in shape_parameters' order."""
    import hashlib

    from cora.llm import shape_parameters
    from trainer.engine import zero3_slice
    out = {}
    for name, p, _ in shape_parameters(llm):
        flat = zero3_slice(p)[0] if hasattr(p, "ds_tensor") else p.data.view(-1)
        out[name] = hashlib.sha256(flat.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy()
                                   .tobytes()).hexdigest()
    return out


def build_rank(args) -> dict:
    """One rank (or, with --whole, the single process): build the LLM and measure."""
    import torch

    from cora.llm import LLMConfig, load_llm, load_tokenizer
    torch.set_num_threads(1)
    cfg = LLMConfig(name=args.llm, dtype=args.dtype, seed=args.seed)
    load_tokenizer(args.llm)
    if args.whole:
        before, t = proc_status()["VmRSS"], time.time()
        llm, _ = load_llm(cfg)
        held = sum(p.numel() * p.element_size() for p in llm.parameters())
        rank, world = 0, 1
    else:
        from trainer.engine import EngineConfig, build_partitioned_llm, ds_config, init_distributed, select_accelerator
        select_accelerator("cpu")
        import deepspeed
        init_distributed("cpu")
        rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
        ds = ds_config(EngineConfig(bf16=args.dtype == "bfloat16"), world)
        before, t = proc_status()["VmRSS"], time.time()
        llm, _ = build_partitioned_llm(cfg, ds)
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in llm.parameters())
    seconds, peak = time.time() - t, proc_status()["VmHWM"]
    params = sum(getattr(p, "ds_numel", p.numel()) for p in llm.parameters())
    elem = next(llm.parameters()).element_size()
    out = {"rank": rank, "world": world, "params": params, "full_mib": round(params * elem / 2**20, 1),
           "rss_before_mib": round(before, 1), "peak_mib": round(peak, 1), "build_mib": round(peak - before, 1),
           "held_mib": round(held / 2**20, 1), "build_s": round(seconds, 1)}
    if args.hashes:
        out["hashes"] = slice_hashes(llm)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> list[dict]:
    """Start the rank processes (this script with --rank-of), wait, and read their reports."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.world),
                   LOCAL_WORLD_SIZE=str(args.world))
        procs = []
        for r in range(args.world):
            cmd = [sys.executable, __file__, "--llm", args.llm, "--dtype", args.dtype, "--seed", str(args.seed),
                   "--report", str(Path(tmp, f"rank{r}.json"))] + (["--hashes"] if args.hashes else [])
            procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=sys.stderr))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"rank processes exited with {codes} (see their stderr above)")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]


def summarise(ranks: list[dict], args) -> dict:
    world, full = ranks[0]["world"], ranks[0]["full_mib"]
    return {"llm": args.llm, "dtype": args.dtype, "world": world, "params": ranks[0]["params"], "full_mib": full,
            "share_mib": round(full / world, 1),
            "build_over_share": round(max(r["build_mib"] for r in ranks) / (full / world), 3), "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--llm", default="smollm2-135m-shape", help="a shape preset (cora.llm.SHAPES)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--world", type=int, default=2, help="rank processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whole", action="store_true", help="build in one process, whole (for comparison)")
    ap.add_argument("--hashes", action="store_true", help="sha256 of every rank's slice of every parameter")
    ap.add_argument("--report", help=argparse.SUPPRESS)           # set for the rank processes
    args = ap.parse_args()
    if args.report or args.whole:
        result = build_rank(args)
        if args.report:
            Path(args.report).write_text(json.dumps(result))
            return
        ranks = [result]
    else:
        ranks = launch(args)
    out = summarise(ranks, args)
    print(json.dumps(out, indent=1) if args.json else json.dumps({k: v for k, v in out.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
