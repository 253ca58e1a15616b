"""``cora scale``: a scaling study, each (size, workers) point a short real ``cora train``.

    cora scale --config configs/demo.yaml --sizes tiny-llama,smollm2-135m-shape --workers 1,2 --steps 10 \
        --out runs/scale [key=value ...]

For each point: the planner (cora.plan, on ``--hardware``) is asked first, with the prompt length
``data.max_length``; a point that does not fit is written as such, not run. Otherwise ``cora train`` runs
with ``llm.name``, ``run.workers`` and ``run.max_steps`` set (``run.run_dir`` under OUT/runs/) and a
``trainer.hooks.Report`` in every worker. The first ``--warmup`` steps are dropped; then

  step_s          median over steps of the slowest rank's step (compute and data wait)
  samples/s       workers x micro-batch / step_s;  tokens/s: the same with the padded prompt tokens
  MFU             4 x N_mm x tokens/s / (workers x F), N_mm the frozen LLM's matmul parameters, F the
                  hardware's achieved FLOP/s per rank (cora.plan.Hardware.flops: on the CPU a measured
                  matrix-product rate, not a datasheet peak)
  weak-scaling efficiency   (samples/s per worker at W) / (samples/s at the size's smallest W): the
                  micro-batch per rank is fixed, so the work per rank is
  planned vs measured       the plan again with the measured padded prompt length; relative errors
                  (planned - measured) / measured of the step time and of the largest peak RSS of a rank

and the report directory gets scaling.csv, scaling.md (the table and a short reading) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

COLUMNS = ["size", "params", "workers", "micro_batch", "global_batch", "seq_len", "partitioning", "status",
           "samples_per_s", "tokens_per_s", "tokens_per_s_per_worker", "mfu", "step_s", "peak_rss_mib",
           "planned_step_s", "planned_peak_mib", "step_error", "memory_error", "weak_efficiency"]


def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="a scaling study: short cora train runs over sizes x workers, a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action="append", help="YAML run config(s), as for cora train")
    p.add_argument("--sizes", required=True, help="comma-separated LLM presets or model directories")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per point")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--hardware", choices=["cpu", "h100"], default="cpu", help="the planner's machine constants")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every point")
    p.set_defaults(func=main)


def main(args) -> int:
    out, sys.stdout = sys.stdout, sys.stderr        # Ray prints worker logs to stdout: only the summary goes there
    try:
        return _main(args, out)
    finally:
        sys.stdout = out


def _main(args, out) -> int:
    from cora.config import ConfigError, load
    from trainer.config import TrainConfig
    problems = []
    sizes = [s for s in args.sizes.split(",") if s]
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        workers = []
        problems.append(f"--workers {args.workers!r} is not a comma-separated list of integers (e.g. 1,2)")
    if args.steps <= args.warmup:
        problems.append(f"--steps {args.steps} must exceed --warmup {args.warmup} (nothing would be measured)")
    if problems:
        print("cora scale: " + "; ".join(problems), file=sys.stderr)
        return 2
    report = Path(args.out)
    report.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sizes:
        for w in workers:
            over = [*args.overrides, f"llm.name={size}", f"run.workers={w}", f"run.max_steps={args.steps}",
                    f"run.run_dir={report.absolute() / 'runs' / f'{size}-w{w}'}", "run.overwrite=true",
                    "run.eval_baseline=false"]
            try:
                cfg = load(TrainConfig, args.config, over)
            except ConfigError as e:
                print(f"cora scale: {size} x {w} workers: {e}", file=sys.stderr)
                return 2
            rows.append(point(cfg, size, w, args, report))
            print(f"[scale] {size} x {w}: {rows[-1]['status']}, {rows[-1]['samples_per_s']} samples/s", file=sys.stderr)
    efficiency(rows)
    write_report(rows, report, args)
    print(json.dumps({"report": str(report), "rows": rows}, indent=1), file=out)
    return 0


def point(cfg, size: str, w: int, args, report: Path) -> dict:
    """One (size, workers) point: planned, then (when it fits) trained and measured."""
    from cora.plan import HARDWARE, plan
    from trainer.planner import setup_for, shape_of
    hw = HARDWARE[args.hardware]
    e = cfg.engine

    def planned(seq: int):
        return plan(setup_for(size, w, e.micro_batch_size, seq, cfg.llm.dtype, e.activation_checkpointing, "zero3",
                              cfg.generator.__dict__, cf_dim=cf_width(cfg), rank=cfg.injection.rank,
                              persistence_threshold=e.persistence(shape_of(size).hidden)), hw)
    row = dict.fromkeys(COLUMNS, "")
    row.update(size=size, workers=w, micro_batch=e.micro_batch_size, partitioning="zero3",
               global_batch=e.micro_batch_size * e.accumulation(w) * w)
    before = planned(cfg.data.max_length)
    row["params"] = before.setup.shape.params
    if not before.fits:
        row.update(status=f"does not fit: planned {before.memory['peak'] / 2**30:.1f} GiB per rank, "
                          f"{hw.memory_bytes / 2**30:.1f} GiB available", planned_peak_mib=round(before.memory["peak"] / 2**20))
        return row
    ranks = measure(cfg, report / "ranks" / f"{size}-w{w}")
    steps = [r["log"][args.warmup:] for r in ranks]
    step_s = statistics.median(max(s["seconds"] + s["data_wait"] for s in group) for group in zip(*steps))
    padded = statistics.mean(sum(s["padded_tokens"] for s in group) for group in zip(*steps))
    seq = round(padded / (w * e.micro_batch_size))
    p = planned(seq)
    peak = max(r["memory"]["peak_rss_mib"] for r in ranks)
    row.update(status="measured", seq_len=seq, step_s=round(step_s, 4),
               samples_per_s=round(w * e.micro_batch_size / step_s, 2), tokens_per_s=round(padded / step_s, 1),
               tokens_per_s_per_worker=round(padded / step_s / w, 1),
               mfu=round(4 * p.setup.shape.matmul_params * padded / step_s / (w * hw.flops), 5),
               peak_rss_mib=peak, planned_step_s=round(p.time["step"], 4),
               planned_peak_mib=round(p.memory["peak"] / 2**20, 1),
               step_error=round((p.time["step"] - step_s) / step_s, 4),
               memory_error=round((p.memory["peak"] / 2**20 - peak) / peak, 4))
    return row


def cf_width(cfg) -> int:
    from trainer.train import _cf_info
    return _cf_info(cfg.data.cf_dir)[0]


def measure(cfg, out: Path) -> list[dict]:
    """Train ``cfg`` with a Report hook; each rank's report (trainer.hooks.Report)."""
    from trainer.hooks import Report
    from trainer.train import train
    out.mkdir(parents=True, exist_ok=True)
    train(cfg, hooks=[Report(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(cfg.run.workers)]


def efficiency(rows: list[dict]) -> None:
    """Weak-scaling efficiency of each measured row against its size's smallest measured worker count."""
    for size in {r["size"] for r in rows}:
        mine = sorted((r for r in rows if r["size"] == size and r["status"] == "measured"), key=lambda r: r["workers"])
        if mine:
            base = mine[0]["samples_per_s"] / mine[0]["workers"]
            for r in mine:
                r["weak_efficiency"] = round(r["samples_per_s"] / r["workers"] / base, 3)


def write_report(rows: list[dict], report: Path, args) -> None:
    with open(report / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    measured = [r for r in rows if r["status"] == "measured"]
    lines = [f"# Scaling study ({', '.join(args.config)}; {args.steps} steps per point, {args.warmup} of warm-up "
             f"dropped; planner hardware: {args.hardware})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Reading", ""]
    if measured:
        worst = max(measured, key=lambda r: max(abs(r["step_error"]), abs(r["memory_error"])))
        within = sum(abs(r["step_error"]) <= 0.15 and abs(r["memory_error"]) <= 0.15 for r in measured)
        lines.append(f"- The planner is within 15% of both measured figures on {within} of {len(measured)} "
                     f"measured points; the worst is {worst['size']} x {worst['workers']} (step time "
                     f"{worst['step_error']:+.1%}, peak memory {worst['memory_error']:+.1%}).")
        lines.append("- Weak-scaling efficiency (samples/s per worker against the smallest worker count): "
                     + ", ".join(f"{r['size']} x {r['workers']}: {r['weak_efficiency']}" for r in measured) + ".")
    skipped = [r for r in rows if r["status"] != "measured"]
    lines += [f"- {r['size']} x {r['workers']}: {r['status']}." for r in skipped]
    (report / "scaling.md").write_text("\n".join(lines) + "\n")
    plots(measured, report)


def plots(rows: list[dict], report: Path) -> None:
    """throughput_memory.png (vs size), efficiency.png (vs workers), planned_vs_measured.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_size = sorted({r["size"] for r in rows}, key=lambda s: next(r["params"] for r in rows if r["size"] == s))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for w in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == w]
        mine.sort(key=lambda r: r["params"])
        a.plot([r["params"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=f"{w} workers")
        b.plot([r["params"] for r in mine], [r["peak_rss_mib"] for r in mine], "o-", label=f"{w} workers")
    for ax, label in ((a, "tokens/s"), (b, "peak RSS per rank (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("LLM parameters")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(report / "throughput_memory.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for size in by_size:
        mine = sorted((r for r in rows if r["size"] == size), key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in mine], [r["weak_efficiency"] for r in mine], "o-", label=size)
    ax.set_xlabel("workers")
    ax.set_ylabel("weak-scaling efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "efficiency.png", dpi=100)
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, got, want, label in ((a, "step_s", "planned_step_s", "step time (s)"),
                                 (b, "peak_rss_mib", "planned_peak_mib", "peak memory per rank (MiB)")):
        ax.scatter([r[got] for r in rows], [r[want] for r in rows])
        for r in rows:
            ax.annotate(f"{r['size']} x{r['workers']}", (r[got], r[want]), fontsize=7)
        top = max([r[got] for r in rows] + [r[want] for r in rows]) * 1.1
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"planned {label}")
    fig.tight_layout()
    fig.savefig(report / "planned_vs_measured.png", dpi=100)
    plt.close(fig)
