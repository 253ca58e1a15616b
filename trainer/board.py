"""What a run shows while it trains: rank 0's TensorBoard scalars and progress bar, and worker logs
routed to stderr (stdout carries only `cora train`'s JSON result)."""

from __future__ import annotations

import sys
from pathlib import Path


class Board:
    """Rank 0's TensorBoard scalars and progress bar (no-ops on other ranks, or without a run directory)."""

    def __init__(self, run_dir: str | None, rank: int, progress: bool = True):
        self.on = rank == 0 and bool(run_dir)
        self.writer = self.bar = None
        if self.on:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir, "tensorboard")))
        self.progress = self.on and progress
        self.world = 1
        self.auc = float("nan")

    def start_epoch(self, epoch: int, steps: int) -> None:
        import torch.distributed as dist
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.progress:
            from tqdm import tqdm
            if self.bar is not None:
                self.bar.close()
            # Ray forwards every flush as a log line: redraw at most every 5 s
            self.bar = tqdm(total=steps, desc=f"epoch {epoch}", file=sys.stderr, unit="step", mininterval=5.0)

    def step(self, n: int, r: dict) -> None:
        """One training step's record (trainer.worker.train_step plus the data-path fields)."""
        if not self.on:
            return
        samples, tokens = r["samples"] * self.world, r["tokens"] * self.world
        step_time = r["seconds"] + r["data_wait"]
        scalars = {"train/loss": r["loss"], "train/lr": r["lr"], "perf/samples_per_s": samples / step_time,
                   "perf/tokens_per_s": tokens / step_time, "time/data_wait_s": r["data_wait"],
                   "time/forward_s": r["forward"], "time/backward_s": r["backward"],
                   "time/optimizer_s": r["optimizer"], "time/embedding_lookup_s": r["lookup_s"]}
        if "padded" in r:                     # this rank's (B, T) slots that hold no real token, and their share
            scalars.update({"data/real_tokens": r["tokens"], "data/padded_tokens": r["padded"],
                            "data/padding_share": r["padded"] / max(r["padded"] + r["tokens"], 1)})
        if r["grad_norm"] is not None:
            scalars["train/grad_norm"] = r["grad_norm"]
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, n)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", valid_auc=f"{self.auc:.4f}",
                                 samples_s=f"{samples / step_time:.1f}", refresh=False)   # redraw at mininterval
            self.bar.update(1)

    def evaluation(self, n: int, e: dict) -> None:
        self.auc = e["valid_auc"]
        if self.writer is not None:
            for k in ("auc", "uauc"):      # UAUC is None when no user has both labels (a small valid split)
                if e[f"valid_{k}"] is not None:
                    self.writer.add_scalar(f"valid/{k}", e[f"valid_{k}"], n)

    def flush(self) -> None:
        """Write the buffered events to the event file (before it is copied: trainer.rundir)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def logs_to_stderr() -> None:
    """Ray forwards a worker's stdout to the driver's stdout, where `cora train` prints its JSON result:
    this worker process writes its logs (its own, DeepSpeed's) to stderr instead."""
    import logging
    sys.stdout = sys.stderr
    from deepspeed.utils import logger
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
