"""``cora scale``: a scaling study, each (size, workers, partitioning) point a short real ``cora train``.

    cora scale --config configs/demo.yaml --sizes tiny-llama,smollm2-135m-shape --workers 1,2 --steps 10 \
        --partitioning auto --out runs/scale [key=value ...]

For each point: the planner (cora.plan, on ``--hardware``, by default the profile of the point's
run.device: h100 for cuda, else cpu) is asked first, with the prompt length ``data.max_length``;
``--partitioning auto`` (the default) takes its choice among a ZeRO-3-partitioned frozen base, the same with
hpZ's node-local secondary partition (``engine.node_ranks``) and a replicated one (the fastest that fits, with
the reason in the ``choice`` column), ``zero3,replicated`` runs both. A point that does not fit is written as such, not run. Otherwise ``cora train`` runs with
``llm.name``, ``run.workers``, ``engine.partitioning`` and ``run.max_steps`` set (``run.run_dir`` under
OUT/runs/; no validation or test: the point is a measurement) and a ``trainer.hooks.Report`` in every worker.
A point whose run fails (it cannot start, or crashes) is written as failed with the error, and the study goes
on (exit status 1 at the end); scaling.csv is rewritten after every point, so a study cut short keeps the
points it measured.
The first ``--warmup`` steps are dropped; then

  step_s          mean over optimiser steps of the slowest rank's step (compute and data wait)
  samples/s       global batch (micro-batch x accumulation x workers) / step_s;  tokens/s: the padded prompt
                  tokens of a step (all ranks) / step_s
  MFU             4 x N_mm x tokens/s / (workers x F), N_mm the frozen LLM's matmul parameters, F
                  --peak-tflops when given, else the hardware profile's datasheet peak (h100: 989 TFLOP/s, dense
                  bf16) or, for the CPU, which has none, its achieved FLOP/s per rank (cora.plan.Hardware.flops: a
                  measured matrix-product rate)
  peak memory     peak_rss_mib: the largest peak resident set of a rank; peak_cuda_mib (run.device=cuda): the
                  largest torch.cuda.max_memory_allocated of a rank, which the planned peak is then compared with
  efficiency      (samples/s per worker at W) / (samples/s per worker at the smallest W of the same size and
                  partitioning): weak scaling when the micro-batch per rank is fixed (the work grows with the
                  workers), strong scaling when engine.global_batch_size is set (the same work, split)
  planned vs measured       the plan again with the measured padded prompt lengths (seq_len: per step the
                  slowest rank's, averaged, for the time; longest: the longest micro-batch's, for the memory); relative errors
                  (planned - measured) / measured of the step time and of the largest peak RSS of a rank

and the report directory gets scaling.csv, scaling.md (the table and a short reading) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from cora.plan import PARTITIONINGS

COLUMNS = ["size", "params", "workers", "micro_batch", "global_batch", "seq_len", "longest", "partitioning",
           "zero_stage", "status",
           "samples_per_s", "tokens_per_s", "tokens_per_s_per_worker", "mfu", "step_s", "peak_rss_mib",
           "peak_cuda_mib", "planned_step_s", "planned_peak_mib", "step_error", "memory_error", "weak_efficiency", "strong_efficiency", "choice", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="a scaling study: short cora train runs over sizes x workers, a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="YAML run config(s), as for cora train")
    p.add_argument("--sizes", help="comma-separated LLM presets or model directories")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per point")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--hardware", choices=["cpu", "h100"],
                   help="the planner's machine constants (default: by each point's run.device: h100 for cuda, else cpu)")
    p.add_argument("--peak-tflops", type=float,
                   help="the MFU's denominator per rank in TFLOP/s; default: the hardware profile's datasheet peak "
                        "(h100: 989, dense bf16) or, without one, its achieved FLOP/s (cpu: a measured rate)")
    p.add_argument("--partitioning", default="auto",
                   help="zero3, hpz, replicated, auto (the planner's choice for each point, with its reason) or a "
                        "comma-separated list of them, each run at every point (e.g. zero3,replicated)")
    p.add_argument("--replan", action="store_true",
                   help="no training: plan the measured points of the report in --out again with the planner's "
                        "current constants (e.g. after benchmarks/calibrate.py --fit), rewriting its planned columns, "
                        "errors, scaling.md and plots (--steps and --warmup as in the run)")
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
    if args.replan:
        return replan(args, out)
    if not args.config or not args.sizes:
        problems.append("--config and --sizes are required (unless --replan)")
    sizes = [s for s in (args.sizes or "").split(",") if s]
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        workers = []
        problems.append(f"--workers {args.workers!r} is not a comma-separated list of integers (e.g. 1,2)")
    partitionings = [p for p in args.partitioning.split(",") if p]
    bad = [p for p in partitionings if p not in (*PARTITIONINGS, "auto")]
    if bad or not partitionings:
        problems.append(f"--partitioning {args.partitioning!r}: each must be {', '.join(PARTITIONINGS)} or auto")
    if args.steps <= args.warmup:
        problems.append(f"--steps {args.steps} must exceed --warmup {args.warmup} (nothing would be measured)")
    if problems:
        print("cora scale: " + "; ".join(problems), file=sys.stderr)
        return 2
    report = Path(args.out)
    report.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sizes:
        for w, part in ((w, part) for w in workers for part in partitionings):
            name = f"{size}-w{w}" + (f"-{part}" if len(partitionings) > 1 else "")
            over = [*args.overrides, f"llm.name={size}", f"run.workers={w}", f"run.max_steps={args.steps}",
                    f"run.run_dir={report.absolute() / 'runs' / name}", "run.overwrite=true",
                    "run.eval_baseline=false", f"engine.partitioning={part}"]   # validated with the point's own
            try:
                cfg = load(TrainConfig, args.config, over)
            except ConfigError as e:
                print(f"cora scale: {size} x {w} workers: {e}", file=sys.stderr)
                return 2
            try:
                rows.append(point(cfg, size, w, part, args, report, name))
            except Exception as e:         # a point that cannot start or crashes: written down, the study goes on
                rows.append(failed(cfg, size, w, part, e))
            write_csv(rows, report)        # after every point: a study cut short keeps the points it measured
            r = rows[-1]
            print(f"[scale] {size} x {w} ({r['partitioning']}{', planner: ' + r['choice'] if r['choice'] else ''}): "
                  f"{r['status']}, {r['samples_per_s']} samples/s", file=sys.stderr)
    efficiency(rows, strong=cfg.engine.global_batch_size is not None)
    write_report(rows, report, args)
    print(json.dumps({"report": str(report), "rows": rows}, indent=1), file=out)
    bad = [f"{r['size']} x {r['workers']} ({r['partitioning']})" for r in rows if r["status"].startswith("failed")]
    if bad:
        print(f"cora scale: {len(bad)} point(s) failed: {', '.join(bad)} (the status column says why; the rest of "
              f"the report stands)", file=sys.stderr)
    return 1 if bad else 0


def new_row(cfg, size: str, w: int, partitioning: str) -> dict:
    """A point's row before it is planned or run: what its config says, every other column empty."""
    e = cfg.engine
    return {**dict.fromkeys(COLUMNS, ""), "size": size, "workers": w, "micro_batch": e.micro_batch_size,
            "global_batch": e.micro_batch_size * e.accumulation(w) * w, "partitioning": partitioning}


def failed(cfg, size: str, w: int, partitioning: str, error: Exception) -> dict:
    """The row of a point whose run raised ``error``: its status says so, on one line."""
    why = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return {**new_row(cfg, size, w, partitioning), "status": f"failed: {type(error).__name__}: {why}"}


def point(cfg, size: str, w: int, partitioning: str, args, report: Path, name: str) -> dict:
    """One (size, workers, partitioning) point: planned ('auto': the planner's choice, with its reason), then
    (when it fits) trained and measured."""
    from cora.plan import plan
    from trainer.planner import choose_for, setup_of
    hw = hardware(args, cfg)
    e, cf_dim = cfg.engine, cf_width(cfg)
    row = new_row(cfg, size, w, partitioning)
    if "auto" in (partitioning, e.activation_checkpointing):    # the planner's choice (also of the checkpointing)
        before, why = choose_for(cfg, partitioning, hw, cf_dim)
        row.update(partitioning=before.setup.partitioning, choice=why)
    else:
        before = plan(setup_of(cfg, partitioning, cf_dim), hw)
    e.partitioning = row["partitioning"]
    row.update(params=before.setup.shape.params, zero_stage=e.stage)
    if not before.fits:
        row.update(status=f"does not fit: planned {before.memory['peak'] / 2**30:.1f} GiB per rank, "
                          f"{before.budget / 2**30:.1f} GiB available", planned_peak_mib=round(before.memory["peak"] / 2**20))
        return row
    row["run"] = name
    return measured(row, cfg, measure(cfg, report / "ranks" / name), hw, cf_dim, args.warmup, mfu_flops(args, hw))


def hardware(args, cfg):
    """The planner's profile of a point: --hardware, else by its run.device (trainer.planner.hardware_of)."""
    from cora.plan import HARDWARE
    from trainer.planner import hardware_of
    return HARDWARE[args.hardware] if args.hardware else hardware_of(cfg)


def mfu_flops(args, hw) -> float:
    """The MFU's denominator per rank: --peak-tflops, else the profile's datasheet peak, else its achieved rate."""
    return args.peak_tflops * 1e12 if args.peak_tflops else hw.peak_flops or hw.flops


def peak_of(row: dict) -> float:
    """The measured peak memory the planned one is compared with: the GPU's when the point ran on one."""
    return row["peak_cuda_mib"] if row["peak_cuda_mib"] not in ("", None) else row["peak_rss_mib"]


def measured(row: dict, cfg, ranks: list[dict], hw, cf_dim: int, warmup: int, flops: float) -> dict:
    """``row`` filled from the ranks' reports (trainer.hooks.Report) and planned again at the measured lengths;
    MFU against ``flops`` per rank."""
    from cora.plan import plan
    from trainer.planner import setup_of
    w = row["workers"]
    # the ZeRO stage the ranks ran (reports before it was recorded: always 3), planned as such
    row["zero_stage"] = ranks[0].get("zero_stage", 3)
    cfg.engine.zero_stage = row["zero_stage"] if row["partitioning"] == "replicated" else "auto"
    steps = [r["log"][warmup:] for r in ranks]
    step_s = statistics.mean(max(s["seconds"] + s["data_wait"] for s in group) for group in zip(*steps))
    padded = statistics.mean(sum(s["padded_tokens"] for s in group) for group in zip(*steps))
    global_batch = row["global_batch"]
    per_rank = global_batch // w
    # a step lasts as long as its slowest rank: the ranks' batches differ in length (bucketed per rank)
    seq = round(statistics.mean(max(s["padded_tokens"] for s in group) for group in zip(*steps)) / per_rank)
    longest = max(s["padded_tokens"] for r in ranks for s in r["log"]) // per_rank
    setup = setup_of(cfg, row["partitioning"], cf_dim, seq)
    p = plan(setup, hw)                                                   # the time at the slowest rank's length
    peak_plan = plan(dataclasses.replace(setup, seq_len=longest), hw).memory["peak"] / 2**20   # the longest
    rss = max(r["memory"]["peak_rss_mib"] for r in ranks)
    cuda = [r["memory"]["peak_cuda_mib"] for r in ranks if "peak_cuda_mib" in r["memory"]]
    row.update(peak_rss_mib=rss, peak_cuda_mib=max(cuda) if cuda else "")
    peak = peak_of(row)
    row.update(status="measured", seq_len=seq, step_s=round(step_s, 4),
               samples_per_s=round(global_batch / step_s, 2), tokens_per_s=round(padded / step_s, 1),
               tokens_per_s_per_worker=round(padded / step_s / w, 1),
               mfu=round(4 * p.setup.shape.matmul_params * padded / step_s / (w * flops), 5),
               planned_step_s=round(p.time["step"], 4),
               planned_peak_mib=round(peak_plan, 1), longest=longest,
               step_error=round((p.time["step"] - step_s) / step_s, 4),
               memory_error=round((peak_plan - peak) / peak, 4))
    return row


def replan(args, out) -> int:
    """``cora scale --replan``: the report in --out planned again (its measurements kept)."""
    from cora.config import from_dict
    from trainer.config import TrainConfig
    report = Path(args.out)
    try:
        with open(report / "scaling.csv", newline="") as f:
            rows = [dict.fromkeys(COLUMNS, "") | r for r in csv.DictReader(f)]
    except OSError as e:
        print(f"cora scale --replan: {report} has no readable scaling.csv ({e}); run cora scale first", file=sys.stderr)
        return 2
    for row in rows:
        for k in ("params", "workers", "micro_batch", "global_batch"):
            row[k] = int(row[k]) if row[k] != "" else ""        # a failed point's may be unknown
        if row["status"] != "measured":
            continue
        name = row["run"] or next(n for n in (f"{row['size']}-w{row['workers']}-{row['partitioning']}",
                                              f"{row['size']}-w{row['workers']}") if (report / "ranks" / n).is_dir())
        cfg = from_dict(TrainConfig, json.loads((report / "runs" / name / "config.json").read_text()))
        ranks = [json.loads(p.read_text()) for p in sorted((report / "ranks" / name).glob("rank*.json"))]
        hw = hardware(args, cfg)
        measured(row, cfg, ranks, hw, cf_width(cfg), args.warmup, mfu_flops(args, hw))
        row["run"] = name
    efficiency(rows, strong=any(r["strong_efficiency"] != "" for r in rows))
    args.config = args.config or [f"replanned from {report}"]
    write_report(rows, report, args)
    print(json.dumps({"report": str(report), "rows": rows}, indent=1), file=out)
    return 0


def cf_width(cfg) -> int:
    from trainer.train import _cf_info
    return _cf_info(cfg.data.cf_dir)[0]


def measure(cfg, out: Path) -> list[dict]:
    """Train ``cfg`` with a Report hook; each rank's report (trainer.hooks.Report)."""
    from trainer.hooks import Report
    from trainer.train import train
    out.mkdir(parents=True, exist_ok=True)
    train(cfg, hooks=[Report(out)], evaluate=False)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(cfg.run.workers)]


def efficiency(rows: list[dict], strong: bool) -> None:
    """Scaling efficiency of each measured row: samples/s per worker against the smallest measured worker count
    of its size and partitioning. Weak scaling when the micro-batch per rank is fixed (the work grows with the
    workers), strong scaling when engine.global_batch_size is (the same work, split)."""
    key = "strong_efficiency" if strong else "weak_efficiency"
    for group in {(r["size"], r["partitioning"]) for r in rows}:
        mine = sorted((r for r in rows if (r["size"], r["partitioning"]) == group and r["status"] == "measured"),
                      key=lambda r: r["workers"])
        if mine:
            base = mine[0]["samples_per_s"] / mine[0]["workers"]
            for r in mine:
                r[key] = round(r["samples_per_s"] / r["workers"] / base, 3)


def scaling_key(rows: list[dict]) -> str:
    """The efficiency column the rows filled (weak or strong scaling)."""
    return "strong_efficiency" if any(r["strong_efficiency"] != "" for r in rows) else "weak_efficiency"


def write_csv(rows: list[dict], report: Path) -> None:
    with open(report / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_report(rows: list[dict], report: Path, args) -> None:
    write_csv(rows, report)
    measured = [r for r in rows if r["status"] == "measured"]
    lines = [f"# Scaling study ({', '.join(args.config)}; {args.steps} steps per point, {args.warmup} of warm-up "
             f"dropped; planner hardware: {args.hardware or 'by run.device'}; MFU = 4 x N_mm x tokens/s / (workers x "
             + (f"{args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "the profile's peak, or its achieved rate on "
                "the CPU") + "))", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Reading", ""]
    if measured:
        worst = max(measured, key=lambda r: max(abs(r["step_error"]), abs(r["memory_error"])))
        within = sum(abs(r["step_error"]) <= 0.15 and abs(r["memory_error"]) <= 0.15 for r in measured)
        lines.append(f"- The planner is within 15% of both measured figures on {within} of {len(measured)} "
                     f"measured points; the worst is {worst['size']} x {worst['workers']} (step time "
                     f"{worst['step_error']:+.1%}, peak memory {worst['memory_error']:+.1%}).")
        key = scaling_key(measured)
        lines.append(f"- {key.split('_')[0].capitalize()}-scaling efficiency (samples/s per worker against the "
                     f"smallest worker count of the same size and partitioning): "
                     + ", ".join(f"{r['size']} x {r['workers']} ({r['partitioning']}): {r[key]}" for r in measured) + ".")
        for r in measured:
            if r["choice"]:
                lines.append(f"- {r['size']} x {r['workers']}: the planner chose {r['choice']}.")
    skipped = [r for r in rows if r["status"] != "measured"]
    lines += [f"- {r['size']} x {r['workers']}: {r['status']}." for r in skipped]
    (report / "scaling.md").write_text("\n".join(lines) + "\n")
    if measured:                  # nothing measured (every point failed or did not fit): nothing to plot
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
        b.plot([r["params"] for r in mine], [peak_of(r) for r in mine], "o-", label=f"{w} workers")
    for ax, label in ((a, "tokens/s"), (b, "peak memory per rank (MiB; GPU: allocated, else RSS)")):
        ax.set_xscale("log")
        ax.set_xlabel("LLM parameters")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(report / "throughput_memory.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    key = scaling_key(rows)
    for size in by_size:
        for part in sorted({r["partitioning"] for r in rows if r["size"] == size}):
            mine = sorted((r for r in rows if (r["size"], r["partitioning"]) == (size, part)), key=lambda r: r["workers"])
            ax.plot([r["workers"] for r in mine], [r[key] for r in mine], "o-", label=f"{size} ({part})")
    ax.set_xlabel("workers")
    ax.set_ylabel(f"{key.split('_')[0]}-scaling efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "efficiency.png", dpi=100)
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, got, want, label in ((a, lambda r: r["step_s"], "planned_step_s", "step time (s)"),
                                 (b, peak_of, "planned_peak_mib", "peak memory per rank (MiB)")):
        ax.scatter([got(r) for r in rows], [r[want] for r in rows])
        for r in rows:
            ax.annotate(f"{r['size']} x{r['workers']}", (got(r), r[want]), fontsize=7)
        top = max([got(r) for r in rows] + [r[want] for r in rows]) * 1.1
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"planned {label}")
    fig.tight_layout()
    fig.savefig(report / "planned_vs_measured.png", dpi=100)
    plt.close(fig)
