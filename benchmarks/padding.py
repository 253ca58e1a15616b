"""Padding waste of the training batches, with and without length bucketing (data.bucket_window) and
rounding to a multiple of 8 (data.pad_multiple).

    python benchmarks/padding.py --json [--epochs 5] [--workers 2] [--batch 8]

Two planted datasets, prepared here by `cora prepare` into a temporary directory:
  demo    the demo's data (./launch.sh demo: 300 users, 200 items, 6,000 interactions), its prompt
  collm   CoLLM-like prompts: CoLLM's template (collm-movies: "A user has given high ratings to the
          following movies: ...") over synthetic movie titles, histories of up to 10 titles
Each train sample's prompt is encoded as the InteractionShard actors encode it (same tokenizer, template,
max_history, max_length; cluster.interactions.read_shard on the shards), then every rank's epoch list is
planned exactly as the actors plan it (cluster.plan.epoch_lists, with a plan.Bucketing for each window
size) and cut into batches. The waste of a batch is its (B, T) slots minus its prompts' tokens, T the
longest prompt rounded up to the multiple; a weight-0 padding batch is all waste. The share
padded / (padded + real) is reported per epoch (each epoch is another shuffle): min, median, max.

The ranks of a step also wait for each other: a step lasts as long as its longest batch. ``idle_share``
is the share of the ranks' step time spent waiting, with a rank's time taken as proportional to its
batch's (B, T) slots: sum over steps and ranks of (T_max of the step - T_rank) / sum of T_max.
With bucketing it is given for both batch orders (``plan.Bucketing.order``): "step" (the same shuffle on
every rank: a step's batches have similar lengths; the trainer's) and "rank" (each rank its own shuffle,
the order before "step"); the padding share is the same for both (the same batches, other steps).
No training runs: this measures the batches, which is what the trainer pads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = {
    "demo": (["--users", "300", "--items", "200", "--interactions", "6000", "--factors", "4", "--rule", "additive"],
             "", None),
    "collm": (["--users", "300", "--items", "200", "--interactions", "6000", "--factors", "4", "--rule", "additive",
               "--domains", "movies,books", "--target-domain", "movies"], "collm-", "target"),
}


def prepare(root: Path, name: str) -> Path:
    import contextlib

    from trainer.cli import main
    flags, _, part = DATASETS[name]
    out = root / name
    with contextlib.redirect_stdout(sys.stderr):           # its summary: stdout carries only this result
        code = main(["prepare", "--source", "synthetic", "--out", str(out), "--samples-per-shard", "500",
                     "--no-progress", *flags])
    if code != 0:
        raise SystemExit(f"cora prepare failed for {name}")
    return out / part if part else out


def shard_lengths(data_dir: Path, family: str, max_history: int, max_length: int) -> list[np.ndarray]:
    """Per train shard, each sample's prompt length in tokens, encoded as the actors encode it."""
    from cluster.interactions import read_shard, split_shards
    from cora.data.schema import manifest_domains, read_manifest
    from cora.prompts import domain_encoders
    from cora.tokenizer import load_tokenizer
    manifest = read_manifest(str(data_dir))
    encoders = domain_encoders(load_tokenizer("smollm2"), family, manifest_domains(manifest), max_history, max_length)
    one = next(iter(encoders.values()))
    paths, _ = split_shards(manifest, str(data_dir), "train")
    return [np.array([len(encoders.get(s.get("domain"), one).encode_with_slots(s["history_titles"], s["title"])[0])
                      for s in read_shard(p, None)]) for p in paths]


def waste(lengths: list[np.ndarray], workers: int, batch: int, epoch: int, window: int, multiple: int,
          order: str = "step") -> tuple:
    """(padded slots, real tokens, idle slots, step slots) of one epoch over all ranks, planned as the actors
    plan it; idle: per step and rank, the slots of (the step's longest T - the rank's T), step: of the step's
    longest T (what the idle share is taken of)."""
    from cluster import plan
    from cora.prompts import round_up
    sizes = [len(x) for x in lengths]
    bucketing = plan.Bucketing(lengths, batch, window, order) if window else None
    owned = [np.concatenate([lengths[s] for s in plan.owned_shards(len(sizes), r, workers)]) for r in range(workers)]
    steps = plan.steps_per_epoch(sum(sizes), workers, batch)
    padded = real = 0
    widths = np.zeros((workers, steps), dtype=np.int64)      # each rank's (B, T) slots per step
    for rank, lst in enumerate(plan.epoch_lists(sizes, workers, 0, epoch, bucketing)):
        for k, b in enumerate(plan.batches(lst, steps, batch)):
            if not b:                                  # the weight-0 padding sample: the rank's first own one
                widths[rank, k] = round_up(int(owned[rank][0]), multiple)
                padded += int(widths[rank, k])
                continue
            n = np.array([owned[o][i] for o, i in b])
            widths[rank, k] = len(b) * round_up(int(n.max()), multiple)
            padded += int(widths[rank, k]) - int(n.sum())
            real += int(n.sum())
    longest = widths.max(0)
    return padded, real, int((longest - widths).sum()), int(longest.sum() * workers)


def measure(lengths, workers: int, batch: int, epochs: int, windows: list[int], multiples: list[int]) -> dict:
    out = {}
    stat = lambda xs: (round(statistics.median(xs), 4), [round(min(xs), 4), round(max(xs), 4)])  # noqa: E731
    for multiple in multiples:
        for window in windows:
            entry = {}
            for order in (("step", "rank") if window else ("step",)):
                shares, idle = [], []
                for epoch in range(epochs):
                    padded, real, waited, slots = waste(lengths, workers, batch, epoch, window, multiple, order)
                    shares.append(padded / (padded + real))
                    idle.append(waited / slots)
                entry["padding_share"], entry["spread"] = stat(shares)
                name = "idle_share" if order == "step" else "idle_share_rank_order"
                entry[name], entry[name + "_spread"] = stat(idle)
            out[f"window={window},multiple={multiple}"] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per rank (the demo's engine.micro_batch_size)")
    ap.add_argument("--windows", default="0,4,16,64", help="data.bucket_window values (0: no bucketing)")
    ap.add_argument("--max-history", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=384, help="data.max_length (the demo config's)")
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    result = {"workers": args.workers, "batch": args.batch, "epochs": args.epochs, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, family, _) in DATASETS.items():
            lengths = shard_lengths(prepare(Path(tmp), name), family, args.max_history, args.max_length)
            flat = np.concatenate(lengths)
            result["datasets"][name] = {
                "train_samples": int(len(flat)),
                "prompt_tokens": {"min": int(flat.min()), "median": float(np.median(flat)), "max": int(flat.max())},
                "waste": measure(lengths, args.workers, args.batch, args.epochs, windows, [1, 8])}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, d in result["datasets"].items():
        print(f"{name}: {d['train_samples']} train samples, prompt tokens {d['prompt_tokens']}")
        for key, v in d["waste"].items():
            rank = f", per-rank order {v['idle_share_rank_order']:.3f}" if "idle_share_rank_order" in v else ""
            print(f"  {key:22s} padding share {v['padding_share']:.3f}  [{v['spread'][0]:.3f}, {v['spread'][1]:.3f}]"
                  f"  ranks idle {v['idle_share']:.3f}{rank}")


if __name__ == "__main__":
    main()
