"""The CoRA training step under DeepSpeed ZeRO-3 and Ray Train: throughput, step-time breakdown, memory.

    python benchmarks/train_step.py --json
    python benchmarks/train_step.py --json --device cuda --bf16 --llm /models/llama-2-7b --workers 1,8 \
        --peak-tflops 989        (a GPU machine: 4 x params x tokens/s over the peak gives the MFU)

For each worker count (default 1 and 2, run one after the other on the same data): a synthetic prepared
dataset (``cora prepare --source synthetic``) and random 64-d CF tables feed one InteractionShard actor
per rank; the Ray Train worker group trains the frozen LLM + CoRA generator for ``--steps`` steps of
micro-batch ``--batch`` per rank. The first ``--warmup`` steps are dropped, then per rank the median of
each phase (data wait, forward, backward, optimiser step) is taken, and

  samples/s = workers x batch / median step time,   tokens/s = the same with the real prompt tokens
  MFU       = 4 x LLM params x tokens/s / (workers x peak FLOP/s)    (the base is frozen: forward 2N
              per token, backward through the activations 2N, no weight gradients)

Peak memory is the resident set of each worker process (CPU) or ``torch.cuda.max_memory_allocated``.
On a 2-core machine the ranks and the data actors share the cores, so 2 workers are slower per sample
than 1: the figure measures the overhead of partitioning, not a speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("data_wait", "forward", "backward", "optimizer")
# the demo's small generator, and the paper's (Q-Former hidden 512, 8 layers, 8 heads: ~25M parameters)
GENERATORS = {"demo": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
              "paper": {}}


def prepare(tmp: Path, dim: int, interactions: int = 4000) -> tuple[Path, Path]:
    """A synthetic dataset of ``interactions`` and random CF tables of ``dim`` columns for its users and items."""
    import pyarrow.parquet as pq

    from cora.cf.store import embedding_table
    from trainer.cli import main
    data, cf = tmp / "data", tmp / "cf"
    with contextlib.redirect_stdout(sys.stderr):         # stdout carries only the benchmark's JSON
        assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "200", "--items", "100",
                     "--interactions", str(interactions), "--samples-per-shard", "250", "--no-progress"]) == 0
    cf.mkdir()
    rng = np.random.default_rng(0)
    for key in ("user", "item"):
        rows = pq.read_table(data / f"{key}s.parquet").num_rows
        pq.write_table(embedding_table(key, rng.standard_normal((rows, dim))), cf / f"{key}_embeddings.parquet")
    return data, cf


def run_workers(workers: int, data: Path, cf: Path, tmp: Path, args) -> dict:
    t = time.time()
    ranks = train_ranks(workers, data, cf, tmp, args, f"bench-{workers}")
    return summarise(ranks, workers, args) | {"wall_s": round(time.time() - t, 1)}


def train_ranks(workers: int, data: Path, cf: Path, tmp: Path, args, name: str, checkpoint: dict | None = None,
                hooks: tuple = ()) -> list[dict]:
    """Train ``args.steps`` steps with ``workers`` ranks; each rank's report (trainer.hooks.Report).
    ``checkpoint``: {"uri", "every", "staging"} to checkpoint every that many steps; ``hooks``: more
    trainer.hooks.Hooks, run before the Report's (which records the step records as they leave them)."""
    from cluster.embeddings import start_embedding_servers
    from cluster.interactions import start_interaction_shards
    from cora.config import from_dict
    from trainer.config import TrainConfig
    from trainer.hooks import Report
    from trainer.recipe import Handover
    from trainer.worker import run
    client = start_embedding_servers(str(cf), shards=1, dim=args.dim, num_cpus=0.1)
    actors = start_interaction_shards(str(data), "train", workers, embeddings=client, batch_size=args.batch,
                                      seed=0, num_cpus=0.1, max_length=args.max_length)
    report = tmp / f"report-{name}"
    report.mkdir()
    checkpoint = checkpoint or {}
    cfg = from_dict(TrainConfig, {
        "llm": {"name": args.llm, "dtype": "bfloat16" if args.bf16 else "float32"},
        "generator": GENERATORS[args.generator],
        "engine": {"micro_batch_size": args.batch, "bf16": args.bf16,
                   "activation_checkpointing": args.activation_checkpointing},
        "run": {"workers": workers, "epochs": 100, "max_steps": args.steps, "device": args.device,
                "cpus_per_worker": args.cpus_per_worker, "checkpoint_every": checkpoint.get("every", 0)}})
    handover = Handover(train=actors, cf_dim=args.dim, total_steps=args.steps, hooks=[*hooks, Report(report)],
                        checkpoint_uri=checkpoint.get("uri"), staging_dir=checkpoint.get("staging"))
    run(cfg, handover, storage_path=str(tmp / f"ray-{name}"), name=name)
    from trainer.train import stop_data
    stop_data({"train": actors}, client)           # each leg starts from the same set of processes
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(workers)]


def summarise(ranks: list[dict], workers: int, args) -> dict:
    steps = [r["log"][args.warmup:] for r in ranks]
    if not all(steps):
        raise SystemExit(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}")
    phase = {k: statistics.median(statistics.median(s[k] for s in log) for log in steps) for k in PHASES}
    step_s = statistics.median(max(s["seconds"] + s["data_wait"] for s in group) for group in zip(*steps))
    tokens = statistics.mean(sum(s["tokens"] for s in group) for group in zip(*steps))
    params = ranks[0]["llm_partition"]["total"]
    out = {"workers": workers, "llm": args.llm, "llm_params": params, "generator": args.generator,
           "trainable_params": ranks[0]["trainable_bytes"] // 4, "batch_per_rank": args.batch,
           "steps_measured": len(steps[0]), "step_s": round(step_s, 4),
           "samples_per_s": round(workers * args.batch / step_s, 2), "tokens_per_s": round(tokens / step_s, 1),
           "breakdown_s": {k: round(v, 4) for k, v in phase.items()},
           "data_wait_share": round(phase["data_wait"] / step_s, 4),
           "llm_share_per_rank": [round(r["llm_partition"]["share"], 4) for r in ranks],
           "peak_memory_mib": [r["memory"] for r in ranks]}
    if args.plan:
        out["plan"] = compare_with_plan(ranks, steps, workers, step_s, args)
    if args.peak_tflops:
        out["mfu"] = round(4 * params * tokens / step_s / (workers * args.peak_tflops * 1e12), 4)
    return out


def compare_with_plan(ranks: list[dict], steps: list[list[dict]], workers: int, step_s: float, args) -> dict:
    """cora.plan's prediction for this configuration (the mean padded prompt length as the sequence) and its
    relative error against the measured step time and the largest peak RSS over the ranks."""
    seq = statistics.mean(s["padded_tokens"] for log in steps for s in log) / args.batch
    peak = max(r["memory"]["peak_rss_mib"] for r in ranks)
    return planned(args.llm, workers, args.batch, round(seq), args.generator, step_s, peak, args)


def planned(llm: str, workers: int, batch: int, seq: int, generator: str, step_s: float, peak_mib: float,
            args) -> dict:
    import dataclasses

    from cora.plan import CPU, plan, relative_error
    from trainer.planner import setup_for
    setup = setup_for(llm, workers, batch, seq, "bfloat16" if args.bf16 else "float32",
                      args.activation_checkpointing, "zero3", generator, args.dim)
    hw = CPU if not args.hardware else dataclasses.replace(CPU, **json.loads(args.hardware))
    p = plan(setup, hw)
    return {"seq_len": seq, "memory_mib": {k: round(v / 2**20, 1) for k, v in p.memory.items()},
            "time_s": {k: round(v, 4) for k, v in p.time.items() if k != "flops"}, "flops": p.time["flops"],
            "measured": {"step_s": step_s, "peak_rss_mib": peak_mib},
            "memory_error": round(relative_error(p.memory["peak"], peak_mib * 2**20), 4),
            "time_error": round(relative_error(p.time["step"], step_s), 4)}


def replan(paths: list[str], args) -> list[dict]:
    """The plan of every result in earlier ``--json --plan`` outputs, with the current constants (--hardware)."""
    rows = []
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            peak = max(m["peak_rss_mib"] for m in r["peak_memory_mib"])
            p = planned(r["llm"], r["workers"], r["batch_per_rank"], r["plan"]["seq_len"], r["generator"],
                        r["step_s"], peak, args)
            rows.append({"llm": r["llm"], "workers": r["workers"], **p})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--llm", default="tiny-llama", help="preset name, smollm2-135m, or a local model directory")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, run one after the other")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures")
    ap.add_argument("--dim", type=int, default=64, help="CF embedding size")
    ap.add_argument("--generator", choices=sorted(GENERATORS), default="demo",
                    help="demo: hidden 64, 2 layers; paper: the paper's Q-Former (hidden 512, 8 layers)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 LLM and engine (GPU)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--plan", action="store_true", help="add cora.plan's prediction and its relative errors")
    ap.add_argument("--hardware", help="JSON overrides of cora.plan.CPU's constants, e.g. '{\"flops\": 3e10}'")
    ap.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device in TFLOP/s, for the MFU")
    ap.add_argument("--replan", nargs="+", metavar="JSON",
                    help="no training: recompute the plan and its errors for these earlier --json --plan outputs")
    args = ap.parse_args()
    if args.replan:
        print(json.dumps(replan(args.replan, args), indent=1))
        return
    out_stream, sys.stdout = sys.stdout, sys.stderr     # Ray prints forwarded logs to stdout: only the JSON goes there
    from cluster import runtime
    counts = [int(w) for w in args.workers.split(",")]
    runtime.init(num_cpus=max(4, max(counts) * args.cpus_per_worker + 2))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data, cf = prepare(Path(tmp), args.dim)
        for w in counts:
            results.append(run_workers(w, data, cf, Path(tmp), args))
            print(f"[train_step] {w} worker(s): {results[-1]['samples_per_s']} samples/s", file=sys.stderr)
    out = {"device": args.device, "results": results}
    print(json.dumps(out, indent=1) if args.json else "\n".join(json.dumps(r) for r in results), file=out_stream)


if __name__ == "__main__":
    main()
