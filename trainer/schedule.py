"""How many optimiser steps a run takes: the length of its LR schedule (``Handover.total_steps``).

    per_epoch(W) = ceil(ceil(ceil(N / W) / B) / k(W))      N train samples, B the micro-batch, k(W) the
                                                           accumulation: engine.gradient_accumulation, or
                                                           global_batch_size / (B x W) when that is set
    fresh run:   per_epoch(W) x run.epochs
    resumed run: steps taken (the checkpoint's) + the steps of what is left of the current epoch on W
                 ranks + per_epoch(W) x the later epochs

For a run that always had the same W both give the same number. After an elastic resume (the
checkpoint saved by W_0 != W ranks) the left-over samples of the epoch are re-planned over W ranks
(``cluster.plan.regroup``) and the schedule is stretched or shrunk to the steps the run will really
take, so that it still ends at ``optim.lr_end`` on the last step; the steps already taken keep their
rates (the schedule continues at the saved step).
"""

from __future__ import annotations

from cluster import plan


def epoch_steps(samples: int, workers: int, micro_batch: int, accumulation: int) -> int:
    """Optimiser steps of an epoch of ``samples`` over ``workers`` ranks (its last window padded)."""
    return -(-plan.steps_per_epoch(samples, workers, micro_batch) // accumulation)


def run_steps(cfg, shard_sizes: list[int], saved: dict | None = None) -> int:
    """The schedule's length for ``cfg`` (a TrainConfig) on a train split of ``shard_sizes``, fresh or resumed
    from the checkpoint state ``saved`` (its state.json: "loop", "cursors")."""
    workers, micro = cfg.run.workers, cfg.engine.micro_batch_size
    k = cfg.engine.accumulation(workers)
    per_epoch = epoch_steps(sum(shard_sizes), workers, micro, k)
    if saved is None:
        return max(1, per_epoch * cfg.run.epochs)
    loop = saved["loop"]
    cursors = plan.regroup(saved["cursors"], workers)
    if cursors[0] is None:                        # saved at an epoch's end: loop["epoch"] is the next one
        return max(1, loop["step"] + per_epoch * max(0, cfg.run.epochs - loop["epoch"]))
    c = cursors[0]
    left = plan.left_in_epoch(shard_sizes, c["seed"], c["epoch"], c.get("stages", []))
    rest = -(-(plan.steps_per_epoch(left, workers, micro) - c["delivered"] // micro) // k)
    return max(1, loop["step"] + rest + per_epoch * max(0, cfg.run.epochs - c["epoch"] - 1))
