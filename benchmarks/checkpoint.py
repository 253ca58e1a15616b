"""Checkpointing cost: training throughput with a checkpoint every N steps versus none, in one run.

    python benchmarks/checkpoint.py --json
    python benchmarks/checkpoint.py --json --uri s3://bucket/bench     (CORA_S3_ENDPOINT for a non-AWS server)

Both legs train the same model on the same data with 2 ZeRO-3 ranks (the set-up of
benchmarks/train_step.py); one checkpoints every ``--every`` steps to ``--uri`` (default: a local
directory), the other never. ``--repeats`` pairs run interleaved, the order within a pair alternating
(none first, then every first, ...) so that drift and warm caches hit both legs alike; the ratio is
taken within each pair, and ``throughput_ratio`` is the median of the pairs' ratios with their (min,
max) in ``spread``. Throughput = samples / (the loop's time: step times, data waits and the
time each save held the loop). Also: the time from each save request to its commit by the background
uploader, and the bytes committed per checkpoint against the trainable state's size (generator + P in
fp32; a checkpoint also holds AdamW's two moments, the RNG states and JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import prepare, train_ranks  # noqa: E402


def throughput(rank0: dict, batch: int, workers: int, warmup: int) -> float:
    log = rank0["log"][warmup:]
    held = sum(r["seconds"] + r["data_wait"] for r in log)
    saves = rank0["checkpoints"]["save_seconds"]
    held += sum(saves[:-1])        # the last save is the end-of-run one, after the steps
    return len(log) * batch * workers / held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--uri", help="checkpoint location (default: a temporary local directory)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=5, help="pairs of legs (without, with), interleaved")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--llm", default="tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--generator", choices=["demo", "paper"], default="paper",
                    help="the generator (and so the checkpoint) size: demo (~0.1M) or the paper's (~25M)")
    args = ap.parse_args()
    args.activation_checkpointing, args.cpus_per_worker, args.peak_tflops = False, 1, None
    out_stream, sys.stdout = sys.stdout, sys.stderr     # Ray prints forwarded logs to stdout: only the JSON goes there
    from cluster import runtime
    runtime.init(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, cf = prepare(tmp, args.dim)
        legs: dict[str, list] = {"none": [], "every": []}
        for rep in range(args.repeats):            # none, every | every, none | ...: drift hits both alike
            uri = f"{args.uri.rstrip('/')}/{rep}" if args.uri else str(tmp / f"ckpt-{rep}")
            ckpt = {"uri": uri, "every": args.every, "staging": str(tmp / f"staging-{rep}")}
            for leg in (("none", "every") if rep % 2 == 0 else ("every", "none")):
                legs[leg].append(train_ranks(2, data, cf, tmp, args, f"{leg}-{rep}", ckpt if leg == "every" else None))
    rates = {k: [throughput(r[0], args.batch, 2, args.warmup) for r in v] for k, v in legs.items()}
    base, with_ckpt = statistics.mean(rates["none"]), statistics.mean(rates["every"])
    ratios = [e / n for n, e in zip(rates["none"], rates["every"])]
    saved = legs["every"][-1]
    commits = saved[0]["checkpoints"]["commits"]
    trainable = saved[0]["trainable_bytes"]
    out = {"workers": 2, "steps": args.steps, "every": args.every, "uri": args.uri or "local directory",
           "samples_per_s_without": round(base, 2), "samples_per_s_with": round(with_ckpt, 2),
           "throughput_ratio": round(statistics.median(ratios), 4),
           "spread": [round(min(ratios), 4), round(max(ratios), 4)], "ratio_each_pair": [round(r, 4) for r in ratios],
           "samples_per_s_each_leg": {k: [round(x, 2) for x in v] for k, v in rates.items()},
           "save_held_loop_s_median": round(statistics.median(saved[0]["checkpoints"]["save_seconds"]), 4),
           "request_to_commit_s_median": round(statistics.median(c["request_to_commit_s"] for c in commits), 4),
           "request_to_commit_s_max": round(max(c["request_to_commit_s"] for c in commits), 4),
           "checkpoints_committed": len(commits), "bytes_per_checkpoint": commits[-1]["bytes"],
           "trainable_state_bytes": trainable, "bytes_ratio": round(commits[-1]["bytes"] / trainable, 3)}
    print(json.dumps(out, indent=1) if args.json else out, file=out_stream)


if __name__ == "__main__":
    main()
