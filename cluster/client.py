"""The trainer side of the data path: an iterator over one rank's ready batches, timing the waits.

``in_flight`` requests (default 2) are kept outstanding (the next batches are asked for before the
current one is returned; the actor answers them in call order), so the trainer waits only when the
InteractionShard actor's prefetch queue has run dry, not for a round trip. ``wait_seconds``
is the total time ``next()`` blocked; ``cursor()`` is the position to save with a checkpoint: it
counts batches handed to the trainer, never those merely prefetched.

When the actor dies, Ray restarts it (``start_interaction_shards(max_restarts=...)``), but its epoch
state, prefetch queue and the calls in flight are gone. A call that fails with a ``RayActorError``
makes the iterator recover: it drops its in-flight requests, calls ``start_epoch(epoch, skip)`` with
skip = the batches handed over so far x batch size (waiting while the actor restarts), and asks
again; the trainer sees the same batches in the same order as without the failure. Each start
carries a fresh token that its ``next_batch`` calls repeat, so a call left over from before (one
that reached a restarted actor, or a live one after a lost reply) gets None and takes no batch. It gives up with
``DataActorLost`` after ``max_recoveries`` recoveries in one epoch, or when the actor cannot come back.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import deque

import ray

from .plan import Cursor

RESTART_TIMEOUT_S = 600.0
"""How long one recovery waits for the restarted actor (it reloads its shards and tokenizer; Ray sends
``start_epoch`` again until the actor is back)."""


class DataActorLost(RuntimeError):
    """The InteractionShard actor feeding this rank died and could not be brought back."""


class BatchIterator:
    def __init__(self, actor, epoch: int, cursor: Cursor | None = None, in_flight: int = 2,
                 max_recoveries: int = 3):
        """``max_recoveries``: actor failures survived in this epoch before giving up."""
        self.actor, self.epoch = actor, epoch
        self.max_recoveries, self.recoveries = max_recoveries, 0
        self.info = ray.get(actor.describe.remote())
        skip = 0
        if cursor is not None:
            self._check(cursor)
            if cursor.epoch != epoch:
                raise ValueError(f"cursor is for epoch {cursor.epoch}, not {epoch}")
            skip = cursor.delivered
        self.stages = list(cursor.stages) if cursor is not None else []     # earlier groups (elastic resume)
        self.bucket_order = cursor.bucket_order if cursor is not None else "step"
        self.consumed = self._first = skip // self.info["batch_size"]
        self._run = uuid.uuid4().hex            # next_batch calls of an earlier start are answered None
        self.remaining = ray.get(actor.start_epoch.remote(epoch, skip, self._run, self.stages, self.bucket_order))
        self.wait_seconds, self.waits = 0.0, []
        self.in_flight = max(1, in_flight)
        self._ask_ahead()

    def _check(self, c: Cursor) -> None:
        i = self.info
        mismatch = {k: (getattr(c, k), i[k]) for k in ("world_size", "batch_size", "seed", "shards", "bucket_window")
                    if getattr(c, k) != i[k]}
        if mismatch:
            raise ValueError(f"cannot resume rank {i['rank']} from this cursor: "
                             + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in mismatch.items())
                             + "; resume with the same data, seed, batch size and data.bucket_window (cursors of another number "
                               "of workers go through cluster.plan.regroup first)")

    def _ask_ahead(self) -> None:
        """Send the first ``in_flight`` next_batch calls after the batches handed over so far."""
        done = self.consumed - self._first
        n = min(self.in_flight, self.remaining - done)
        self._refs = deque(self.actor.next_batch.remote(run=self._run) for _ in range(n))
        self._asked = done + n

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        while True:
            if not self._refs:
                raise StopIteration
            try:
                batch = ray.get(self._refs[0])
                break
            except ray.exceptions.RayActorError as e:
                self._recover(e)
        self._refs.popleft()
        waited = time.perf_counter() - t0               # a recovery counts as waiting for data
        if batch is None:
            self._refs.clear()
            if not self.exhausted:         # never silently short: only another start_epoch does this
                i = self.info
                raise RuntimeError(f"{i['split']} rank {i['rank']}, epoch {self.epoch}: the actor ended the epoch "
                                   f"after {self.consumed - self._first} of {self.remaining} batches because "
                                   f"start_epoch was called again elsewhere; use one BatchIterator per actor at "
                                   f"a time")
            raise StopIteration
        self.wait_seconds += waited
        self.waits.append(waited)
        self.consumed += 1
        if self._asked < self.remaining + 1:     # + 1: the call that returns the end of the epoch
            self._refs.append(self.actor.next_batch.remote(run=self._run))
            self._asked += 1
        return batch

    def _recover(self, error: ray.exceptions.RayActorError) -> None:
        """Start the epoch again on the (restarted) actor just after the last batch handed over."""
        i = self.info
        where = f"{i['split']} rank {i['rank']}, epoch {self.epoch}"
        if self.recoveries >= self.max_recoveries:
            raise DataActorLost(f"{where}: the InteractionShard actor failed {self.recoveries + 1} time(s) in "
                                f"this epoch, more than max_recoveries={self.max_recoveries}; see its log "
                                f"(`ray logs`, the dashboard) for why it dies: {error}") from error
        self.recoveries += 1
        skip = self.consumed * i["batch_size"]
        print(f"[data] {i['split']} rank {i['rank']}: actor restarted ({type(error).__name__}), resuming epoch "
              f"{self.epoch} at sample {skip} (recovery {self.recoveries} of {self.max_recoveries})",
              file=sys.stderr, flush=True)
        self._refs.clear()              # the calls in flight died with the actor, or take nothing now
        self._run = uuid.uuid4().hex
        try:
            left = ray.get(self.actor.start_epoch.remote(self.epoch, skip, self._run, self.stages, self.bucket_order),
                           timeout=RESTART_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise DataActorLost(f"{where}: the InteractionShard actor did not come back after it failed "
                                f"(recovery {self.recoveries} of {self.max_recoveries}): {e}; check the actor's "
                                f"log and that start_interaction_shards ran with max_restarts != 0") from e
        want = self.remaining - (self.consumed - self._first)
        if left != want:
            raise DataActorLost(f"{where}: the restarted actor has {left} batches left after sample {skip}, "
                                f"{want} were expected; its data changed under the run")
        self._ask_ahead()

    def __len__(self) -> int:
        return self.remaining

    @property
    def exhausted(self) -> bool:
        """Every batch of the epoch has been handed over."""
        return self.consumed - self._first >= self.remaining

    def cursor(self) -> Cursor:
        i = self.info
        # batch slots handed over (a whole number of batches; the last batch of an epoch may be short)
        return Cursor(epoch=self.epoch, delivered=self.consumed * i["batch_size"], seed=i["seed"], world_size=i["world_size"],
                      batch_size=i["batch_size"], shards=i["shards"], rng={"seed": [i["seed"], self.epoch, i["rank"]]},
                      stages=self.stages, bucket_window=i["bucket_window"], bucket_order=self.bucket_order)
