"""Checkpointing cost: training throughput with a checkpoint every N steps versus none, side by side in one run.

    python benchmarks/checkpoint.py --json
    python benchmarks/checkpoint.py --json --uri s3://bucket/bench     (CORA_S3_ENDPOINT for a non-AWS server)
    python benchmarks/checkpoint.py --json --legs                      (separate runs per leg, the older method)
    python benchmarks/checkpoint.py --json --stage-only                (the stager's cost alone: direct vs buffered)

2 ZeRO-3 ranks train the frozen LLM + generator (the set-up of benchmarks/train_step.py). After ``--warmup``
steps the run is cut into blocks of ``--block`` steps (default 20) that alternate between checkpointing
every ``--every`` steps (a save after the block's first step's predecessor and after its middle one: the
slow steps that follow a save fall inside the block) and no checkpointing, ``--repeats`` pairs of blocks,
the order within a pair rotating (none, every | every, none | ...). The same processes, data and memory
serve both sides, so only the checkpointing differs and the drift of a shared machine hits both alike.
A block's throughput = its samples / (its steps' times, data waits included, + the time each of its
saves held the loop); the ratio is taken within each pair: ``throughput_ratio`` is their median,
``spread`` their (min, max). A pair whose blocks cross an epoch's end (a save of its own) is left out
and counted in ``pairs_dropped``.

``--legs``: each side as a run of its own, ``--repeats`` pairs of runs (the method of the README's older
rows); the legs' start-up and placement differ, which on this machine moved the side without
checkpoints by up to 30% between runs.

``--stage-only``: no training; a paper-sized captured state (31M parameters: 372 MB of files) is staged
``--repeats`` times each way into a directory beside the system's temporary one, written direct
(``O_DIRECT``, the default) and buffered (through the page cache) in turns, every checkpoint kept until
the end as a run keeps them; the staging thread's CPU time and wall time of each.

``--no-write``: as the default, but the stager's writes are dropped (the files it commits are holes of the right
size, never read): the difference from a default run is what writing the bytes to the disk costs training.

``cost_per_save_s``: where a checkpointing block's extra time goes, per save (medians over the pairs): the loop
held by the save, and the excess over the other block's median step of the first and second steps after a save
and of the other steps; rank 0's steps (it writes the checkpoint), and ``cost_per_save_s_rank1`` rank 1's.

Also: the time from each save request to its commit by the background uploader, and the bytes committed
per checkpoint against the trainable state's size (generator + P in fp32; a checkpoint also holds AdamW's
two moments, the RNG states and JSON).
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

from trainer.hooks import Hooks  # noqa: E402


class Alternate(Hooks):
    """Switches checkpointing on and off by block (``blocks``: per block index, whether it checkpoints) and
    notes in each step's record the seconds the saves since the previous step held the loop (``held``) and
    the block the step belongs to (``block``; -1 for the warm-up and beyond the last block). A save after
    step s is the Checkpointer's, due when s is a multiple of ``every`` and the block of step s + 1
    checkpoints."""

    def __init__(self, warmup: int, block: int, every: int, blocks: list[bool], write: bool = True):
        self.warmup, self.block, self.every, self.blocks, self.seen = warmup, block, every, blocks, 0
        self.write = write

    def after_setup(self, recipe) -> None:
        if not self.write:      # --no-write: the stager copies and hashes every byte but writes none of them
            from trainer.checkpoint import uploader
            uploader._write_all = lambda fd, view: None

    def block_of(self, step: int) -> int:
        k = (step - 1 - self.warmup) // self.block
        return k if step > self.warmup and k < len(self.blocks) else -1

    def after_step(self, recipe, record: dict, batch: dict) -> None:
        saves = recipe.ckpt.save_seconds
        record["held"], self.seen = sum(saves[self.seen:]), len(saves)
        record["block"] = self.block_of(record["step"])
        following = self.block_of(record["step"] + 1)
        recipe.ckpt.every = self.every if following >= 0 and self.blocks[following] else 0


def block_rates(log: list[dict], batch: int, workers: int, blocks: list[bool]) -> list[dict]:
    """Per block: whether it checkpoints, its samples/s (the loop's time: steps, data waits, held by saves),
    its saves, and whether an epoch ended inside it."""
    out = []
    for k, every in enumerate(blocks):
        steps = [r for r in log if r.get("block") == k]
        held = sum(r["seconds"] + r["data_wait"] + r["held"] for r in steps)
        out.append({"every": every, "rate": len(steps) * batch * workers / held,
                    "saves": sum(r["held"] > 0 for r in steps), "epochs": len({r["epoch"] for r in steps})})
    return out


def cost_per_save(log: list[dict], kept: list[int], blocks: list[bool]) -> dict:
    """Where a checkpointing block's extra time goes, per save, median over the kept pairs: the loop held by
    the save itself, then each step's excess over the median step of the pair's block without checkpoints,
    summed separately for the first and second step after a save and for the other steps (a uniform
    slowdown: background threads taking the cores the ranks train on)."""
    phases = ("data_wait", "forward", "backward", "optimizer")
    parts: dict[str, list] = {"held": [], "first_step_after": [], "second_step_after": [], "other_steps": [],
                              **{f"first_step_after_{ph}": [] for ph in phases}}
    for p in kept:
        none_k, every_k = (2 * p, 2 * p + 1) if not blocks[2 * p] else (2 * p + 1, 2 * p)
        none = [r for r in log if r.get("block") == none_k]
        base = statistics.median(r["seconds"] + r["data_wait"] for r in none)
        base_phase = {ph: statistics.median(r[ph] for r in none) for ph in phases}
        steps = [r for r in log if r.get("block") == every_k]
        saves = sum(r["held"] > 0 for r in steps)
        if not saves:
            continue
        got = dict.fromkeys(parts, 0.0)
        since = None            # which step after the last save this is (a step's "held" is the save before it)
        for r in steps:
            since = 1 if r["held"] > 0 else (None if since is None else since + 1)
            key = {1: "first_step_after", 2: "second_step_after"}.get(since, "other_steps")
            got[key] += r["seconds"] + r["data_wait"] - base
            got["held"] += r["held"]
            if since == 1:
                for ph in phases:
                    got[f"first_step_after_{ph}"] += r[ph] - base_phase[ph]
        for k in parts:
            parts[k].append(got[k] / saves)
    return {k: round(statistics.median(v), 4) for k, v in parts.items() if v}


def in_one_run(args, data, cf, tmp) -> dict:
    blocks = [side for p in range(args.repeats) for side in ((False, True) if p % 2 == 0 else (True, False))]
    uri = args.uri.rstrip("/") + "/blocks" if args.uri else str(tmp / "ckpt")
    ckpt = {"uri": uri, "every": args.every, "staging": str(tmp / "staging")}
    ranks = train_ranks(2, data, cf, tmp, args, "blocks", ckpt,
                        hooks=(Alternate(args.warmup, args.block, args.every, blocks, not args.no_write),))
    rates = block_rates(ranks[0]["log"], args.batch, 2, blocks)
    pairs, kept = [], []
    for p in range(args.repeats):
        a, b = rates[2 * p], rates[2 * p + 1]
        if a["epochs"] > 1 or b["epochs"] > 1:
            continue
        none, every = (a, b) if not a["every"] else (b, a)
        pairs.append((none["rate"], every["rate"]))
        kept.append(p)
    return {"pairs": pairs, "pairs_dropped": args.repeats - len(kept), "report": ranks[0],
            "cost_per_save": [cost_per_save(r["log"], kept, blocks) for r in ranks],
            "saves_per_block": [r["saves"] for r in rates if r["every"]],
            "save_held_loop_s": [r["held"] for r in ranks[0]["log"] if r["held"] > 0]}   # the blocks' saves


def leg_rate(rank0: dict, batch: int, workers: int, warmup: int) -> float:
    log = rank0["log"][warmup:]
    held = sum(r["seconds"] + r["data_wait"] for r in log)
    saves = rank0["checkpoints"]["save_seconds"]
    held += sum(saves[:-1])        # the last save is the end-of-run one, after the steps
    return len(log) * batch * workers / held


def in_legs(args, data, cf, tmp) -> dict:
    legs: dict[str, list] = {"none": [], "every": []}
    for rep in range(args.repeats):            # none, every | every, none | ...: drift hits both alike
        uri = f"{args.uri.rstrip('/')}/{rep}" if args.uri else str(tmp / f"ckpt-{rep}")
        ckpt = {"uri": uri, "every": args.every, "staging": str(tmp / f"staging-{rep}")}
        for leg in (("none", "every") if rep % 2 == 0 else ("every", "none")):
            legs[leg].append(train_ranks(2, data, cf, tmp, args, f"{leg}-{rep}", ckpt if leg == "every" else None))
    rates = {k: [leg_rate(r[0], args.batch, 2, args.warmup) for r in v] for k, v in legs.items()}
    saved = legs["every"][-1][0]
    return {"pairs": list(zip(rates["none"], rates["every"])), "pairs_dropped": 0, "report": saved,
            "save_held_loop_s": saved["checkpoints"]["save_seconds"][:-1]}


def stage_only(repeats: int, where: str | None) -> dict:
    """The stager's own cost: ``trainer.checkpoint.stage`` of a paper-sized state, direct and buffered in turns."""
    import time

    import torch

    from trainer.checkpoint import stage
    g = torch.Generator().manual_seed(0)
    n = 31_000_000 // 10
    weights = {f"w{i}": torch.randn(n, generator=g) for i in range(10)}
    opt = {f"w{i}::{k}": torch.randn(n, generator=g) for i in range(10) for k in ("exp_avg", "exp_avg_sq")}
    parts = (weights, opt, {"rank0": torch.get_rng_state()}, {"world_size": 2})
    out: dict = {"direct": {"cpu_s": [], "wall_s": []}, "buffered": {"cpu_s": [], "wall_s": []}}
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        for rep in range(repeats):
            for mode in (("direct", "buffered") if rep % 2 == 0 else ("buffered", "direct")):
                cpu, wall = time.thread_time(), time.perf_counter()
                stage(Path(tmp, mode), rep, parts, False, None, {}, None, direct=mode == "direct")
                out[mode]["cpu_s"].append(round(time.thread_time() - cpu, 3))
                out[mode]["wall_s"].append(round(time.perf_counter() - wall, 3))
    return {"bytes": sum(t.numel() * 4 for d in parts[:2] for t in d.values()), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--uri", help="checkpoint location (default: a temporary local directory)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--block", type=int, default=20, help="steps per block (a multiple of --every)")
    ap.add_argument("--repeats", type=int, default=7, help="pairs of blocks (or of legs), interleaved")
    ap.add_argument("--warmup", type=int, default=10, help="steps before the first block (a multiple of --every)")
    ap.add_argument("--legs", action="store_true", help="each side as a run of its own, --steps steps each")
    ap.add_argument("--steps", type=int, default=80, help="with --legs: steps per leg")
    ap.add_argument("--llm", default="tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--generator", choices=["demo", "paper"], default="paper",
                    help="the generator (and so the checkpoint) size: demo (~0.1M) or the paper's (~25M)")
    ap.add_argument("--no-write", action="store_true",
                    help="the stager copies and hashes but writes nothing (files committed as holes): the disk's share")
    ap.add_argument("--stage-only", action="store_true", help="only the stager's cost, direct vs buffered")
    ap.add_argument("--stage-dir", help="with --stage-only: where to stage (default: the temporary directory)")
    args = ap.parse_args()
    if args.no_write and (args.legs or args.stage_only):
        ap.error("--no-write measures blocks in one run; drop --legs and --stage-only")
    if args.stage_only:
        got = stage_only(args.repeats, args.stage_dir)
        print(json.dumps(got, indent=1) if args.json else got)
        return
    if args.block % args.every or args.warmup % args.every:
        ap.error(f"--block ({args.block}) and --warmup ({args.warmup}) must be multiples of --every ({args.every})")
    args.activation_checkpointing, args.cpus_per_worker, args.peak_tflops = False, 1, None
    out_stream, sys.stdout = sys.stdout, sys.stderr     # Ray prints forwarded logs to stdout: only the JSON goes there
    from cluster import runtime
    runtime.init(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.legs:        # the blocks, and one step after them (the end-of-run save follows the last step)
            args.steps = args.warmup + 2 * args.repeats * args.block + 1
        # one epoch holds every block: an epoch's end saves a checkpoint of its own
        data, cf = prepare(tmp, args.dim, interactions=max(4000, int(args.steps * args.batch * 2 * 1.5)))
        got = (in_legs if args.legs else in_one_run)(args, data, cf, tmp)
    ratios = [e / n for n, e in got["pairs"]]
    report = got["report"]
    commits = report["checkpoints"]["commits"]
    trainable = report["trainable_bytes"]
    out = {"workers": 2, "method": "legs" if args.legs else "blocks in one run", "every": args.every,
           "writes": "dropped (--no-write)" if args.no_write else "to the staging disk",
           "uri": args.uri or "local directory",
           **({"steps_per_leg": args.steps} if args.legs else {"block": args.block, "warmup": args.warmup}),
           "samples_per_s_without": round(statistics.mean(n for n, _ in got["pairs"]), 2),
           "samples_per_s_with": round(statistics.mean(e for _, e in got["pairs"]), 2),
           "throughput_ratio": round(statistics.median(ratios), 4),
           "spread": [round(min(ratios), 4), round(max(ratios), 4)], "ratio_each_pair": [round(r, 4) for r in ratios],
           "pairs_dropped": got["pairs_dropped"],
           "samples_per_s_each_pair": [[round(n, 2), round(e, 2)] for n, e in got["pairs"]],
           "save_held_loop_s_median": round(statistics.median(got["save_held_loop_s"]), 4),
           "save_held_loop_s_max": round(max(got["save_held_loop_s"]), 4),
           "request_to_commit_s_median": round(statistics.median(c["request_to_commit_s"] for c in commits), 4),
           "request_to_commit_s_max": round(max(c["request_to_commit_s"] for c in commits), 4),
           "checkpoints_committed": len(commits), "bytes_per_checkpoint": commits[-1]["bytes"],
           "trainable_state_bytes": trainable, "bytes_ratio": round(commits[-1]["bytes"] / trainable, 3)}
    if "cost_per_save" in got:
        out["cost_per_save_s"] = got["cost_per_save"][0]
        out["cost_per_save_s_rank1"] = got["cost_per_save"][1]
    if "saves_per_block" in got:
        out["saves_per_checkpointing_block"] = got["saves_per_block"]
    print(json.dumps(out, indent=1) if args.json else out, file=out_stream)


if __name__ == "__main__":
    main()
